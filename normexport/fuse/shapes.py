"""ONNX shape inference on the graph's structure only: every tensor over 1 KB is replaced, for
the call, by a placeholder with its dtype and shape and no data (initializers and Constant
nodes alike), so the memory it takes does not grow with the weights. Small tensors (shapes,
axes) stay, for data propagation.

Shapes let the checks prove that a scale broadcasts along the normalized dims only. ONNX's
inference cannot see into onnxruntime's own ops; it keeps what it cannot infer.
"""

from __future__ import annotations

import onnx_ir as ir

from normexport.errors import first_line

PLACEHOLDER_BYTES = 1024


def _placeholder(tensor: ir.TensorProtocol) -> ir.ExternalTensor:
    return ir.ExternalTensor("normexport-shape-inference-placeholder", 0, tensor.nbytes, tensor.dtype,
                             shape=ir.Shape(list(tensor.shape)), name=tensor.name or "")


def _swap_big_tensors(model: ir.Model) -> list:
    """Replace each tensor over PLACEHOLDER_BYTES by a placeholder; returns how to undo it."""
    undo = []
    nodes = [n for g in model.graphs() for n in g]
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    for graph in model.graphs():
        for v in graph.initializers.values():
            t = v.const_value
            if t is not None and not isinstance(t, ir.ExternalTensor) and t.nbytes > PLACEHOLDER_BYTES:
                undo.append((v, t))
                v.const_value = _placeholder(t)
    for node in nodes:
        for name, attr in list(node.attributes.items()):
            t = attr.value if attr.type == ir.AttributeType.TENSOR else None
            if t is not None and not isinstance(t, ir.ExternalTensor) and t.nbytes > PLACEHOLDER_BYTES:
                undo.append((node, attr))
                node.attributes[name] = ir.AttrTensor(name, _placeholder(attr.value))
    return undo


def _restore(undo: list) -> None:
    for owner, original in reversed(undo):
        if isinstance(owner, ir.Value):
            owner.const_value = original
        else:
            owner.attributes[original.name] = original


def structure_proto(model: ir.Model):
    """The model as a ModelProto without the data of its tensors over 1 KB."""
    undo = _swap_big_tensors(model)
    try:
        return ir.serde.serialize_model(model)
    finally:
        _restore(undo)


def infer_shapes(model: ir.Model) -> tuple[str | None, bool]:
    """Fill in the shapes and dtypes ONNX infers: strict mode, or where that fails, the
    partial result of non-strict mode. Returns (why strict mode failed or None, whether
    non-strict mode failed too: then the model keeps the shapes it had)."""
    import onnx

    proto = structure_proto(model)
    why = None
    for strict in (True, False):
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=strict, strict_mode=strict, data_prop=True)
        except Exception as e:  # onnx's own failure on this graph: reported, never silent
            why = why or f"{type(e).__name__}: {first_line(str(e), 200)}"
            continue
        _merge(model, inferred)
        return why, False
    return why, True


def _merge(model: ir.Model, inferred) -> None:
    """Shapes and dtypes from ``inferred`` onto ``model``'s values of the same name, where the
    inferred one is known."""
    known = {}
    graphs = [inferred.graph]
    while graphs:
        g = graphs.pop()
        for vi in list(g.value_info) + list(g.output) + list(g.input):
            known.setdefault(vi.name, vi)
        for node in g.node:
            for a in node.attribute:
                graphs.extend([a.g] if a.HasField("g") else list(a.graphs))
    for graph in model.graphs():
        for value in ir.convenience.create_value_mapping(graph).values():
            vi = known.get(value.name)
            if vi is None or not vi.type.HasField("tensor_type"):
                continue
            typ = ir.serde.deserialize_type_proto_for_type(vi.type)
            shape = ir.serde.deserialize_type_proto_for_shape(vi.type)
            if shape is not None and value.shape != shape:
                value.shape = shape
            if typ is not None and typ.dtype is not None and value.dtype != typ.dtype:
                value.dtype = typ.dtype
