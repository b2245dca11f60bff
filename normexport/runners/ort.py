"""onnxruntime: CPU now; the CUDA and TensorRT providers where onnxruntime-gpu is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from normexport.errors import NormexportError, first_line
from normexport.runners.base import Backend, Runner


class OrtRunner(Runner):
    """``optimize=False`` disables onnxruntime's graph optimizations, so that its own fusions
    can neither hide nor fake ours (validation); ``True`` is what a user deploys (bench)."""

    def __init__(self, model: str | Path | bytes, backend: Backend, optimize: bool = True, threads: int | None = None,
                 profile_prefix: str | None = None):
        """``backend``: an onnxruntime backend's record (its execution providers, in order)."""
        if not backend.onnxruntime:
            raise NormexportError(f"backend {backend.name} is not onnxruntime", "use make_onnx_runner, which builds each backend's own runner")
        self.model = model
        self.backend = backend.name
        self.record = backend
        self.providers = list(backend.providers)
        self.optimize = optimize
        self.threads = threads
        self.profile_prefix = profile_prefix
        self.name = f"{backend}{'' if optimize else ' (no graph opt)'}"
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort

        self.record.check_available()
        wanted = self.providers
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if self.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = self.profile_prefix
        model = str(self.model) if isinstance(self.model, Path) else self.model
        try:
            self.session = ort.InferenceSession(model, so, providers=wanted)
        except Exception as e:
            msg = first_line(e)
            hint = "check the target matches your runtime (--target decompose for runtimes without the fused op)"
            if "NOT_IMPLEMENTED" in msg and self.record.cpu:
                hint = "onnxruntime's CPU provider lacks kernels for this dtype (bfloat16 has almost none): validate on a GPU --backend, or pass --no-validate --no-bench"
            raise NormexportError(f"onnxruntime ({self.backend}) cannot load the model: {msg}", hint) from None

    def deactivate(self) -> None:
        self.session = None

    def end_profiling(self) -> str | None:
        return self.session.end_profiling() if self.session is not None and self.profile_prefix else None

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.input_names
        missing = [n for n in names if n not in feed]
        if missing:
            raise NormexportError(f"the ONNX model wants input(s) {', '.join(missing)}, the feed has {', '.join(feed)}", "name the inputs as the model does (--input NAME:...)")
        try:
            outs = self.session.run(None, {n: feed[n] for n in names})
        except Exception as e:
            text = str(e).strip()
            if "INVALID_ARGUMENT" not in text and "Unexpected input data type" not in text:
                raise
            msg = first_line(text).split("] ", 1)[-1]
            raise NormexportError(f"onnxruntime rejects the inputs: {msg}", "give --input shapes and dtypes that match the ONNX model's inputs") from e
        return dict(zip(self.output_names, outs))
