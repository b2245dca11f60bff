"""Backends that run a model on a feed: ``with make_runner(...) as r: r.infer(feed)``."""

from __future__ import annotations

from normexport.errors import NormexportError
from normexport.runners.base import Runner
from normexport.runners.ort import PROVIDERS, OrtRunner
from normexport.runners.torch_runner import TorchRunner

ONNX_BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt")


def make_onnx_runner(model, backend: str = "ort-cpu", optimize: bool = True, threads: int | None = None, **kw) -> Runner:
    if backend in PROVIDERS:
        return OrtRunner(model, backend, optimize=optimize, threads=threads, **kw)
    if backend == "trt":
        from normexport.runners.trt import TrtRunner  # tensorrt is optional

        return TrtRunner(model, **kw)
    raise NormexportError(f"unknown backend '{backend}'", f"one of {', '.join(ONNX_BACKENDS)}")


__all__ = ["Runner", "TorchRunner", "OrtRunner", "make_onnx_runner", "ONNX_BACKENDS"]
