"""Backends that run a model on a feed: ``with make_onnx_runner(path, backend) as r: r.infer(feed)``.

One record per backend (``BACKEND_RECORDS``): how it builds a runner, which targets it runs,
whether onnxruntime's profiler can measure its norm share, and whether folding a residual Add
into the fused norm pays off there. A new backend is one record here and its runner module;
the CLI's choices and help and the pipeline's checks ask this registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from normexport.errors import NormexportError
from normexport.fuse.registry import RESIDUAL_CHOICES  # re-exported: the CLI and options read it here
from normexport.lazy import lazy_names
from normexport.runners.base import Backend

if TYPE_CHECKING:
    from normexport.runners.base import Runner

# The runner classes, imported on first use: the records stay readable (the CLI's choices and
# help) without importing numpy or a runtime.
__getattr__, __dir__ = lazy_names(__name__, {"Runner": "base", "OrtRunner": "ort", "TorchRunner": "torch_runner"})

TRT_PRECISION = {None: "fp32", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _make_ort(record: Backend, model, optimize: bool, threads: int | None, dtype: str | None, **kw) -> Runner:
    """onnxruntime runs the graph's own dtypes: ``dtype`` plays no part."""
    from normexport.runners.ort import OrtRunner

    return OrtRunner(model, record, optimize=optimize, threads=threads, **kw)


def _make_trt(record: Backend, model, optimize: bool, threads: int | None, dtype: str | None, **kw) -> Runner:
    """``dtype`` (the model's --dtype) sets TensorRT's build precision."""
    from normexport.runners.trt import TrtRunner  # tensorrt is optional

    runner = TrtRunner(model, precision=TRT_PRECISION.get(dtype, "fp32"), **kw)
    runner.name = record.name
    return runner


_GPU_FOLD = "the fused kernel reads the residual sum once (GPU kernels gain from it)"
BACKEND_RECORDS = (
    Backend("ort-cpu", _make_ort, "onnxruntime, CPU", providers=("CPUExecutionProvider",), cpu=True, contrib_ops=True, fold_residual=False,
            residual_why="onnxruntime's CPU kernel of the folded op runs slower than Add + the norm (docs/BENCHMARKS.md)"),
    Backend("ort-cuda", _make_ort, "onnxruntime, CUDA", providers=("CUDAExecutionProvider", "CPUExecutionProvider"), contrib_ops=True, residual_why=_GPU_FOLD),
    Backend("ort-trt", _make_ort, "onnxruntime's TensorRT provider",
            providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), residual_why=_GPU_FOLD),
    Backend("trt", _make_trt, "TensorRT itself (runs trt-plugin nodes)", plugin_targets=("trt-plugin",), residual_why=_GPU_FOLD),
)
_BY_NAME = {b.name: b for b in BACKEND_RECORDS}
BACKENDS = tuple(_BY_NAME)
DEFAULT_BACKEND = BACKENDS[0]  # also the reference: the unfused model and localisation run on it


def backend_record(name: str | Backend) -> Backend:
    """The record of backend ``name`` (a record is its own); an unknown name is the user's error."""
    if isinstance(name, Backend):
        return name
    try:
        return _BY_NAME[name]
    except KeyError:
        raise NormexportError(f"unknown backend '{name}'", f"one of {', '.join(BACKENDS)}") from None


def onnxruntime_backend(backend: str | Backend) -> Backend:
    """``backend``'s record where onnxruntime runs it, else the default backend's (onnxruntime on CPU)."""
    record = backend_record(backend)
    return record if record.onnxruntime else backend_record(DEFAULT_BACKEND)


def require_onnxruntime(backend: str | Backend, what: str) -> Backend:
    """``backend``'s record, where onnxruntime runs it and this onnxruntime has its first
    execution provider; else the user's error naming what needs it (exit 2, before any work)."""
    record = backend_record(backend)
    if not record.onnxruntime:
        on = ", ".join(b.name for b in BACKEND_RECORDS if b.onnxruntime)
        raise NormexportError(f"{what} runs on onnxruntime; --backend {record.name} is not onnxruntime", f"use --backend {on}")
    record.check_available()
    return record




def backends_running(target) -> list[Backend]:
    """The backends that run ``target`` (a target's record or name); none is the user's error:
    nothing could run, validate or time the model."""
    from normexport.fuse.registry import target_record

    record = target_record(target)
    found = [b for b in BACKEND_RECORDS if b.runs(record)]
    if not found:
        raise NormexportError(f"no backend runs target {record.name}", "choose a target a backend runs (see --target in --help)")
    return found


def residual_layout(choice: str | bool, backend, target) -> tuple[bool, str]:
    """Whether to fold residual Adds into the fused norm, and the report's line saying which
    layout and why. ``choice``: on / off (or True / False), or auto: as ``backend``'s record says.
    ``backend`` and ``target``: records (or names)."""
    from normexport.fuse.registry import target_record

    if choice not in RESIDUAL_CHOICES and not isinstance(choice, bool):
        raise NormexportError(f"unknown --residual-fusion '{choice}'", f"one of {', '.join(RESIDUAL_CHOICES)}")
    target = target_record(target)
    if not target.folds_residual:
        return False, f"residual Adds: separate (target {target.name} has no op that takes one in)"
    if choice == "auto":
        record = backend_record(backend)
        if not record.runs(target):  # the model is for the backends that run it: their layout
            record = backends_running(target)[0]
        fold = record.fold_residual
        return fold, f"residual Adds: {'folded into the fused norm' if fold else 'kept separate'} (--residual-fusion auto for {record.name}: {record.residual_why})"
    fold = choice in (True, "on")
    return fold, f"residual Adds: {'folded into the fused norm' if fold else 'kept separate'} (--residual-fusion {'on' if fold else 'off'})"


def backends_help() -> str:
    return "; ".join(f"{b.name}: {b.help}" for b in BACKEND_RECORDS) + "."


def make_onnx_runner(model, backend: str | Backend = DEFAULT_BACKEND, optimize: bool = True, threads: int | None = None, dtype: str | None = None, **kw) -> Runner:
    """A runner of ``model`` on ``backend`` (a record, or its name): its record builds it."""
    record = backend_record(backend)
    return record.make(record, model, optimize, threads, dtype, **kw)


__all__ = ["Runner", "TorchRunner", "OrtRunner", "Backend", "BACKEND_RECORDS", "BACKENDS", "DEFAULT_BACKEND",
           "backend_record", "backends_running", "onnxruntime_backend", "require_onnxruntime", "residual_layout", "RESIDUAL_CHOICES", "backends_help", "make_onnx_runner"]
