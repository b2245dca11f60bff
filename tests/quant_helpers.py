"""Helpers of the quantization tests: onnxruntime's MatMulNBits weights back in float64, and a
quantized folder broken on purpose."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx


def int4_rows(packed: np.ndarray, scales: np.ndarray, n: int, k: int, block: int) -> np.ndarray:
    """MatMulNBits' symmetric int4 weight back in float64 as [N, K]: blocks of ``block`` along
    K, two values a byte (low nibble first), each (q - 8) x its block's scale."""
    packed = packed.reshape(n, -1)
    scales = scales.astype(np.float64).reshape(n, -1)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1).astype(np.float64) - 8
    return (q.reshape(n, -1, block) * scales[:, :, None]).reshape(n, -1)[:, :k]


def break_scales(src: Path, dst: Path, pick, factor: float) -> str:
    """A copy of the quantized folder ``src`` at ``dst`` with one MatMulNBits' scales times
    ``factor``: ``pick`` is its index among the MatMulNBits nodes, or the name of its output.
    Returns the node's name."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    node = nodes[pick] if isinstance(pick, int) else next(n for n in nodes if n.output[0] == pick)
    init = next(i for i in model.graph.initializer if i.name == node.input[2])
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * factor, init.name))
    onnx.save(model, str(dst / "model.onnx"))
    return node.name
