"""Backends that run a model on a feed: ``with make_onnx_runner(path, backend) as r: r.infer(feed)``.

One record per backend (``BACKEND_RECORDS``): how it builds a runner, which targets it runs,
whether onnxruntime's profiler can measure its norm share, and whether folding a residual Add
into the fused norm pays off there. A new backend is one record here and its runner module;
the CLI's choices and help and the pipeline's checks ask this registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from normexport.errors import NormexportError

if TYPE_CHECKING:
    from normexport.runners.base import Runner

_RUNNER_MODULES = {"Runner": "base", "OrtRunner": "ort", "TorchRunner": "torch_runner"}


def __getattr__(name: str):
    """The runner classes, imported on first use: the records stay readable (the CLI's choices
    and help) without importing numpy or a runtime."""
    if name in _RUNNER_MODULES:
        return getattr(importlib.import_module(f"normexport.runners.{_RUNNER_MODULES[name]}"), name)
    raise AttributeError(f"module 'normexport.runners' has no attribute {name!r}")

TRT_PRECISION = {None: "fp32", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Backend:
    name: str
    make: Callable[..., Runner]  # (record, model, optimize, threads, dtype, **kw) -> Runner
    help: str
    providers: tuple[str, ...] = ()  # onnxruntime's execution providers, in order; () = not onnxruntime
    plugin_targets: tuple[str, ...] = ()  # targets only backends naming them run (beside every portable one)
    fold_residual: bool = True  # folding a residual Add into the fused norm pays off here
    residual_why: str = ""  # why (the report shows it when ``--residual-fusion auto`` chose)

    @property
    def onnxruntime(self) -> bool:
        """onnxruntime runs it: its profiler measures the norm share, and localisation can run on it."""
        return bool(self.providers)

    @property
    def cpu(self) -> bool:
        return self.providers == ("CPUExecutionProvider",)

    def runs(self, target: str) -> bool:
        from normexport.fuse.registry import target_record

        return target_record(target).portable or target in self.plugin_targets


def _make_ort(record: Backend, model, optimize: bool, threads: int | None, dtype: str | None, **kw) -> Runner:
    """onnxruntime runs the graph's own dtypes: ``dtype`` plays no part."""
    from normexport.runners.ort import OrtRunner

    return OrtRunner(model, record.name, optimize=optimize, threads=threads, providers=record.providers, **kw)


def _make_trt(record: Backend, model, optimize: bool, threads: int | None, dtype: str | None, **kw) -> Runner:
    """``dtype`` (the model's --dtype) sets TensorRT's build precision."""
    from normexport.runners.trt import TrtRunner  # tensorrt is optional

    runner = TrtRunner(model, precision=TRT_PRECISION.get(dtype, "fp32"), **kw)
    runner.name = record.name
    return runner


_GPU_FOLD = "the fused kernel reads the residual sum once (GPU kernels gain from it)"
BACKEND_RECORDS = (
    Backend("ort-cpu", _make_ort, "onnxruntime, CPU", providers=("CPUExecutionProvider",), fold_residual=False,
            residual_why="onnxruntime's CPU kernel of the folded op runs slower than Add + the norm (docs/BENCHMARKS.md)"),
    Backend("ort-cuda", _make_ort, "onnxruntime, CUDA", providers=("CUDAExecutionProvider", "CPUExecutionProvider"), residual_why=_GPU_FOLD),
    Backend("ort-trt", _make_ort, "onnxruntime's TensorRT provider",
            providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), residual_why=_GPU_FOLD),
    Backend("trt", _make_trt, "TensorRT itself (runs trt-plugin nodes)", plugin_targets=("trt-plugin",), residual_why=_GPU_FOLD),
)
_BY_NAME = {b.name: b for b in BACKEND_RECORDS}
BACKENDS = tuple(_BY_NAME)
ONNX_BACKENDS = BACKENDS
DEFAULT_BACKEND = BACKENDS[0]  # also the reference: the unfused model and localisation run on it


def backend_record(name: str) -> Backend:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise NormexportError(f"unknown backend '{name}'", f"one of {', '.join(BACKENDS)}") from None


def onnxruntime_backend(name: str) -> str:
    """``name`` where onnxruntime runs it, else the default backend (onnxruntime on CPU)."""
    return name if backend_record(name).onnxruntime else DEFAULT_BACKEND


RESIDUAL_CHOICES = ("auto", "on", "off")


def residual_layout(choice: str | bool, backend: str, target: str) -> tuple[bool, str]:
    """Whether to fold residual Adds into the fused norm, and the report's line saying which
    layout and why. ``choice``: on / off (or True / False), or auto: as ``backend``'s record says."""
    from normexport.fuse.registry import target_record

    if choice not in RESIDUAL_CHOICES and not isinstance(choice, bool):
        raise NormexportError(f"unknown --residual-fusion '{choice}'", f"one of {', '.join(RESIDUAL_CHOICES)}")
    if not target_record(target).folds_residual:
        return False, f"residual Adds: separate (target {target} has no op that takes one in)"
    if choice == "auto":
        record = backend_record(backend)
        if not record.runs(target):  # the model is for the backends that run it: their layout
            record = next(b for b in BACKEND_RECORDS if b.runs(target))
        fold = record.fold_residual
        return fold, f"residual Adds: {'folded into the fused norm' if fold else 'kept separate'} (--residual-fusion auto for {record.name}: {record.residual_why})"
    fold = choice in (True, "on")
    return fold, f"residual Adds: {'folded into the fused norm' if fold else 'kept separate'} (--residual-fusion {'on' if fold else 'off'})"


def backends_help() -> str:
    return "; ".join(f"{b.name}: {b.help}" for b in BACKEND_RECORDS) + "."


def make_onnx_runner(model, backend: str = DEFAULT_BACKEND, optimize: bool = True, threads: int | None = None, dtype: str | None = None, **kw) -> Runner:
    """A runner of ``model`` on ``backend`` (its record builds it)."""
    record = backend_record(backend)
    return record.make(record, model, optimize, threads, dtype, **kw)


__all__ = ["Runner", "TorchRunner", "OrtRunner", "Backend", "BACKEND_RECORDS", "BACKENDS", "ONNX_BACKENDS", "DEFAULT_BACKEND",
           "backend_record", "onnxruntime_backend", "residual_layout", "RESIDUAL_CHOICES", "backends_help", "make_onnx_runner"]
