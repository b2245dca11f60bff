"""Backends that run a model on a feed: ``with make_runner(...) as r: r.infer(feed)``."""

from __future__ import annotations

from normexport.errors import NormexportError
from normexport.runners.base import Runner
from normexport.runners.ort import PROVIDERS, OrtRunner
from normexport.runners.torch_runner import TorchRunner

ONNX_BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt")


TRT_PRECISION = {None: "fp32", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def make_onnx_runner(model, backend: str = "ort-cpu", optimize: bool = True, threads: int | None = None, dtype: str | None = None, **kw) -> Runner:
    """``dtype`` (the model's --dtype) sets TensorRT's build precision; onnxruntime runs the
    graph's own dtypes."""
    if backend in PROVIDERS:
        return OrtRunner(model, backend, optimize=optimize, threads=threads, **kw)
    if backend == "trt":
        from normexport.runners.trt import TrtRunner  # tensorrt is optional

        return TrtRunner(model, precision=TRT_PRECISION.get(dtype, "fp32"), **kw)
    raise NormexportError(f"unknown backend '{backend}'", f"one of {', '.join(ONNX_BACKENDS)}")


__all__ = ["Runner", "TorchRunner", "OrtRunner", "make_onnx_runner", "ONNX_BACKENDS"]
