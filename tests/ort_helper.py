"""The tests' one way to run an ONNX model in onnxruntime on the CPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def session(model, optimize: bool = False) -> ort.InferenceSession:
    """A CPU session for a path or an ``onnx.ModelProto``. ``optimize=False`` turns
    onnxruntime's graph optimizer off, so that its own fusions neither hide nor fake ours."""
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model, feed: dict, optimize: bool = False) -> list[np.ndarray]:
    """All outputs of ``model`` on the entries of ``feed`` that it takes as inputs."""
    sess = session(model, optimize)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feed.items() if k in names})
