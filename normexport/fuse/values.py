"""Reading constants and attributes off ONNX IR nodes (the patterns' and the scales' checks)."""

from __future__ import annotations

import onnx_ir as ir


def const_ints(value: ir.Value | None) -> list[int] | None:
    """The integers of a constant value (an initializer or a Constant's output), else None."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return [int(v) for v in tensor.numpy().reshape(-1)]


def attribute(node: ir.Node, name: str, default=None):
    """The value of ``node``'s attribute ``name``, or ``default`` where it has none."""
    a = node.attributes.get(name)
    return default if a is None else a.value
