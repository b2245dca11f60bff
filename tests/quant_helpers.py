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


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """The share of rows of logits where PyTorch's softmax gives the quantized argmax at least
    half the probability of its own (the same token, or a near-tie), in float64."""
    ref = np.asarray(ref, np.float64).reshape(-1, np.shape(ref)[-1])
    got = np.asarray(got, np.float64).reshape(ref.shape)
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return float(np.mean(p[np.arange(len(p)), got.argmax(-1)] >= 0.5 * p.max(-1)))


def break_quantizer(monkeypatch, pick: int) -> None:
    """normexport's quantizer, with the scales of the ``pick``-th MatMulNBits (graph order) x4 in
    what it returns."""
    import onnx_ir as ir

    import normexport.quantize as quantize

    real = quantize.quantize_model

    def broken(model, opts):
        q, report = real(model, opts)
        scales = [n for n in q.graph if n.op_type == "MatMulNBits"][pick].inputs[2]
        scales.const_value = ir.tensor(scales.const_value.numpy() * 4.0, name=scales.name)
        return q, report

    monkeypatch.setattr(quantize, "quantize_model", broken)
