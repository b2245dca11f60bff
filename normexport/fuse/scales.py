"""Scales that span dims the norm does not normalize: exporters write them (an RMSNormalization
scale need only broadcast to X), and the fused ops take the normalized shape only."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normexport.fuse.values import attribute as _attr
from normexport.fuse.values import const_ints

MAX_REDUCE_ELEMENTS = 1 << 24  # a constant scale larger than this is not read to test it


def _broadcasts_into(dims: list[int], x: ir.Value) -> bool:
    """True if a tensor of shape ``dims`` broadcasts to x's shape without changing it."""
    if x.shape is None or len(dims) > x.shape.rank():
        return False
    return all(d == 1 or (isinstance(xd, int) and d == xd) for d, xd in zip(reversed(dims), reversed(list(x.shape))))


def reduced_scale(scale: ir.Value, x: ir.Value, axis: int) -> tuple[str, np.ndarray | None] | None:
    """A scale that spans unnormalized dims of x but holds the same values along them, as the
    fused op takes it: ("ones", None) for all ones, ("array", normalized-shape array) for
    others; None when that cannot be proven (then the scale must stay a Mul).

    Covers what torch's exporter writes for ``F.rms_norm(x, shape)`` without weight at opset
    23: ``ConstantOfShape`` of x's whole shape (a constant or ``Shape(x)``)."""
    dims = list(x.shape)[axis:] if x.shape is not None else None
    known = dims is not None and all(isinstance(d, int) for d in dims)
    node = scale.producer()
    if node is not None and node.op_type == "ConstantOfShape" and node.domain == "" and not scale.is_graph_input():
        attr = node.attributes.get("value")
        c = attr.value.numpy().reshape(-1)[0] if attr is not None else 0.0
        src = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        whole_x = (src is not None and src.op_type == "Shape" and src.domain == "" and src.inputs[0] is x
                   and not _attr(src, "start", 0) and _attr(src, "end") is None)
        shape = const_ints(node.inputs[0]) if node.inputs else None
        if not (whole_x or (shape is not None and _broadcasts_into(shape, x))):
            return None
        if c == 1:
            return ("ones", None)
        return ("array", np.full(dims, c)) if known else None
    tensor = ir.convenience.get_const_tensor(scale) if not scale.is_graph_input() else None
    if tensor is None or not known or tensor.size > MAX_REDUCE_ELEMENTS or not _broadcasts_into(list(tensor.shape), x):
        return None
    arr = tensor.numpy()
    lead = arr.shape[: max(0, arr.ndim - len(dims))]
    try:
        rows = np.broadcast_to(arr, tuple(lead) + tuple(dims)).reshape(-1, int(np.prod(dims)))
    except ValueError:
        return None
    if not (rows == rows[:1]).all():
        return None
    return ("array", rows[0].reshape(dims))
