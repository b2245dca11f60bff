"""One rewrite per target: the internal RMSNorm node into the op a runtime runs.

Internal node semantics (see patterns.py): y = cast_out(rms(x) · scale + bias), with rms
computed in ``stash_type`` over the dims from ``axis`` to the last.

Every target computes the norm in fp32 (or fp64 where the model did) whatever the model's
dtype, and gets X and scale of one dtype: the wider of the input's and the output's, so that
no cast narrows a value before the norm (fp16 squares never overflow) and no fp32 output is
rounded through fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normexport.fuse.names import Names
from normexport.fuse.ops import (
    MS_DOMAIN,
    RMS_NORMALIZATION,
    SIMPLIFIED_LN,
    SKIP_SIMPLIFIED_LN,
    TRT_DOMAIN,
    TRT_PLUGIN_NAME,
    TRT_PLUGIN_NAMESPACE,
    TRT_PLUGIN_VERSION,
)
from normexport.fuse.patterns import INTERNAL_DOMAIN, INTERNAL_OP, FusionLog, wider

__all__ = ["MS_DOMAIN", "TRT_DOMAIN", "TRT_PLUGIN_NAME", "TRT_PLUGIN_NAMESPACE", "TRT_PLUGIN_VERSION", "Lowered", "NormNode", "lower",
           "lower_ort", "lower_onnx", "lower_trt_plugin", "lower_decompose", "fold_constant"]


@dataclass
class Lowered:
    nodes: list[ir.Node]
    old_nodes: list[ir.Node]
    old_values: list[ir.Value]
    new_values: list[ir.Value]
    op: str
    residual: bool = False


class _Builder:
    """Makes nodes and initializers with unique names next to one fused norm."""

    def __init__(self, graph: ir.Graph, prefix: str, names: Names, log: FusionLog, opset: int = 17):
        self.graph = graph
        self.opset = opset  # the model's default-domain opset (a subgraph has no imports of its own)
        self.log = log
        self.prefix = prefix
        self.names = names
        self.nodes: list[ir.Node] = []

    def _name(self, what: str) -> str:
        return self.names.fresh(f"{self.prefix}/{what}")

    def node(self, op_type: str, inputs, domain: str = "", num_outputs: int = 1, **attrs) -> ir.Node:
        node = ir.Node(
            domain,
            op_type,
            inputs,
            attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items() if v is not None],
            num_outputs=num_outputs,
            name=self._name(op_type),
        )
        for i, out in enumerate(node.outputs):
            out.name = self.names.fresh(f"{node.name}_out{i}")
        self.nodes.append(node)
        return node

    def op(self, op_type: str, *inputs, domain: str = "", dtype: ir.DataType | None = None, shape=None, **attrs) -> ir.Value:
        out = self.node(op_type, list(inputs), domain=domain, **attrs).outputs[0]
        if dtype is not None:
            out.dtype = dtype
        if shape is not None:
            out.shape = shape
        return out

    def const(self, array: np.ndarray, what: str) -> ir.Value:
        value = ir.Value(name=self._name(what), shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        value.const_value = ir.tensor(array, name=value.name)
        self.graph.register_initializer(value)
        return value

    def cast(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        """Value in ``dtype``: constants are converted in place of a Cast node."""
        if value.dtype == dtype:
            return value
        tensor = value.const_value if not value.is_graph_input() else None
        if tensor is not None:
            return self.const(tensor.numpy().astype(dtype.numpy()), f"{value.name}_as_{dtype.name.lower()}")
        return self.op("Cast", value, to=int(dtype), dtype=dtype, shape=value.shape)


def _normalized_shape(x: ir.Value, axis: int) -> list | None:
    if x.shape is None:
        return None
    dims = list(x.shape)[axis:]
    return dims if all(isinstance(d, int) for d in dims) else None


MAX_FOLD_NODES = 16
MAX_ONES_ELEMENTS = 1 << 20  # a norm without scale gets a stored ones tensor up to this size


def fold_constant(value: ir.Value) -> np.ndarray | None:
    """The value of ``value`` if it is computed from constants only (e.g. Gemma's 1 + w),
    evaluated once here by ONNX's reference evaluator; None if any input is a graph input."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    nodes, leaves, todo, seen = [], {}, [value], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.const_value is not None and not v.is_graph_input():
            leaves[v.name] = v.const_value.numpy()
            continue
        node = v.producer()
        if node is None or node.domain not in ("", "ai.onnx") or len(nodes) >= MAX_FOLD_NODES or any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values()):
            return None
        nodes.append(node)
        todo.extend(i for i in node.inputs if i is not None)
    if not nodes:
        return None
    order = [n for n in value.graph if n in set(nodes)] if value.graph is not None else list(reversed(nodes))
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in order], "fold", [],
        [onnx.helper.make_tensor_value_info(value.name, int(value.dtype), None)],
        [onnx.numpy_helper.from_array(np.asarray(a), name) for name, a in leaves.items()],
    )
    opset = value.graph.opset_imports.get("", 18) if value.graph is not None else 18
    try:
        return np.asarray(ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])).run(None, {})[0])
    except Exception:
        return None  # leave it computed: correct, one op more


def _scale_in(b: _Builder, x: ir.Value, scale: ir.Value | None, axis: int, dtype: ir.DataType, flat: bool) -> ir.Value:
    """The scale as the fused op wants it: exactly the normalized shape (or flattened to one
    dim for ops that normalize only the last dim) in ``dtype``; ones where there was none."""
    dims = _normalized_shape(x, axis)
    if dims is None:
        b.log.shape_blocked.append(f"the normalized dims of {x.name} are unknown")
    want = [int(np.prod(dims))] if (flat and dims is not None) else dims
    if scale is None:
        ones = ir.tensor(np.ones([1], dtype=dtype.numpy()))
        if want is not None and int(np.prod(want)) <= MAX_ONES_ELEMENTS:
            return b.const(np.ones(want, dtype=dtype.numpy()), "ones_scale")
        if want is not None:  # a large normalized shape: the runtime makes the ones, the file holds none
            return b.op("ConstantOfShape", b.const(np.array(want, np.int64), "ones_shape"), value=ones, dtype=dtype, shape=ir.Shape(want))
        shape = b.op("Shape", x, start=axis, dtype=ir.DataType.INT64)
        return b.op("ConstantOfShape", shape, value=ones, dtype=dtype)
    if (scale.const_value is None or scale.is_graph_input()) and _fits(scale, want):
        folded = fold_constant(scale)
        if folded is not None:
            scale = b.const(folded.astype(scale.dtype.numpy()), f"{scale.name}_folded")
    scale = b.cast(scale, dtype)
    if want is not None and (scale.shape is None or list(scale.shape) != want):
        if scale.const_value is not None and not scale.is_graph_input():
            return b.const(scale.const_value.numpy().reshape(want), f"{scale.name}_reshaped")
        target = b.const(np.array(want, dtype=np.int64), "scale_shape")
        return b.op("Reshape", scale, target, dtype=dtype, shape=ir.Shape(want))
    return scale


def _fits(value: ir.Value, want: list | None) -> bool:
    """True if ``value`` has a known shape of at most ``want``'s size: folding it stores no
    more than the scale the fused op takes (never a tensor the size of an activation)."""
    if want is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return False
    return int(np.prod(list(value.shape))) <= int(np.prod(want))


def _residual_add(x: ir.Value, log: FusionLog) -> ir.Node | None:
    """The Add feeding the norm when it is a residual sum: two inputs of one shape (no
    broadcasting), rank 2 or 3, float32 (what onnxruntime's CPU and CUDA kernels share)."""
    add = x.producer()
    if add is None or add.op_type != "Add" or add.domain != "":
        return None
    a, c = add.inputs
    if a is None or c is None:
        return None
    if a.shape is None or c.shape is None or x.shape is None:
        log.shape_blocked.append(f"the shapes of the residual Add {add.name} are unknown")
        return None
    if x.dtype != ir.DataType.FLOAT or a.dtype != ir.DataType.FLOAT:
        return None
    if a.shape.rank() not in (2, 3) or list(a.shape) != list(c.shape) or list(a.shape) != list(x.shape):
        return None
    if any(not isinstance(d, int) and d.value is None for d in a.shape):
        return None  # anonymous symbolic dims: equality unknown
    return add


@dataclass
class NormNode:
    """One internal norm node, read: what every lowering takes."""

    node: ir.Node
    x: ir.Value
    scale: ir.Value | None
    bias: ir.Value | None
    eps: float
    axis: int
    stash: ir.DataType
    out_dtype: ir.DataType
    io: ir.DataType  # one dtype for X, scale and Y: the wider of the input's and the output's
    residual: ir.Node | None  # the residual Add to fold into the fused op, where one is taken

    @classmethod
    def read(cls, node: ir.Node, log: FusionLog, fold_residual: bool) -> NormNode:
        inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
        x, scale, bias = inputs[:3]
        attrs = {k: a.value for k, a in node.attributes.items()}
        axis, out_dtype = int(attrs["axis"]), ir.DataType(int(attrs["out_dtype"]))
        io = wider(x.dtype, out_dtype)
        residual = _residual_add(x, log) if fold_residual and axis == -1 and io == x.dtype else None
        return cls(node, x, scale, bias, float(attrs["epsilon"]), axis, ir.DataType(int(attrs["stash_type"])), out_dtype, io, residual)


def lower(model: ir.Model, record, log: FusionLog, names: Names, residual: bool = True) -> list[Lowered]:
    """Rewrite every internal node of ``model`` with ``record``'s lowering (a target record of
    registry.py); returns what was done. ``residual``: fold a residual Add that feeds a norm
    into the fused op where the target has such an op."""
    done = []
    for graph in list(model.graphs()):  # the main graph and every subgraph (If branches, Loop bodies)
        done += _lower_graph(model, graph, record, log, names, residual)
    if any(d.residual for d in done):
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    if done and record.domain:
        model.opset_imports.setdefault(record.domain, 1)
    return done


def _lower_graph(model: ir.Model, graph: ir.Graph, record, log: FusionLog, names: Names, residual: bool) -> list[Lowered]:
    done = []
    for node in list(graph):
        if node.domain != INTERNAL_DOMAIN or node.op_type != INTERNAL_OP:
            continue
        entry = log.by_output.get(id(node.outputs[0]))
        norm = NormNode.read(node, log, residual and record.folds_residual)
        b = _Builder(graph, (node.name or "rmsnorm").replace("/", "_") + "_fused", names, log, opset=model.opset_imports.get("", 17))
        lowered = record.lower(b, norm)
        for n in lowered.nodes:
            n.metadata_props["normexport.pattern"] = entry.pattern if entry else "rms"
        final = lowered.new_values[0].producer()
        if final is not None:  # where the norm's result is: validation's localisation reads it
            final.metadata_props["normexport.role"] = "norm-output"
            if entry is not None and entry.module:
                final.metadata_props["normexport.module"] = entry.module
        ir.convenience.replace_nodes_and_values(graph, node, lowered.old_nodes, lowered.nodes, lowered.old_values, lowered.new_values)
        if entry is not None:
            entry.name = lowered.nodes[0].name if lowered.nodes else node.name
            entry.op = lowered.op
            entry.residual = lowered.residual
            entry.output = lowered.new_values[0].name
        done.append(lowered)
    graph.sort()
    return done


def lower_decompose(b: _Builder, n: NormNode) -> Lowered:
    y = _decompose(b, n.x, n.scale, n.bias, n.eps, n.axis, n.stash, n.out_dtype)
    return Lowered(b.nodes, [n.node], [n.node.outputs[0]], [y], "primitive ops")


def lower_onnx(b: _Builder, n: NormNode) -> Lowered:
    return _lower_plain(b, n, RMS_NORMALIZATION)


def lower_ort(b: _Builder, n: NormNode) -> Lowered:
    if n.residual is None:
        return _lower_plain(b, n, SIMPLIFIED_LN)
    gamma = _scale_in(b, n.x, n.scale, n.axis, n.io, flat=False)
    skip = b.node(SKIP_SIMPLIFIED_LN, [n.residual.inputs[0], n.residual.inputs[1], gamma], domain=MS_DOMAIN, num_outputs=4, epsilon=n.eps)
    y = skip.outputs[0]
    y.dtype, y.shape = n.io, n.x.shape
    total = skip.outputs[3]
    total.dtype, total.shape = n.x.dtype, n.x.shape
    y = _finish(b, y, n.out_dtype, n.bias)
    return Lowered(b.nodes, [n.node, n.residual], [n.node.outputs[0], n.residual.outputs[0]], [y, total], SKIP_SIMPLIFIED_LN, True)


def _lower_plain(b: _Builder, n: NormNode, op_type: str) -> Lowered:
    """One standard-signature norm op (X, scale; axis, epsilon, stash_type), then cast and bias."""
    gamma = _scale_in(b, n.x, n.scale, n.axis, n.io, flat=False)
    y = b.op(op_type, b.cast(n.x, n.io), gamma, axis=n.axis, epsilon=n.eps, stash_type=int(n.stash), dtype=n.io, shape=n.x.shape)
    y = _finish(b, y, n.out_dtype, n.bias)
    return Lowered(b.nodes, [n.node], [n.node.outputs[0]], [y], op_type)


def lower_trt_plugin(b: _Builder, n: NormNode) -> Lowered:
    x, io, residual = n.x, n.io, n.residual
    gamma = _scale_in(b, x, n.scale, n.axis, io, flat=True)  # the plugin normalizes the last dim only
    bias_in = b.cast(n.bias, io) if n.bias is not None else None
    if bias_in is not None and bias_in.shape is not None and bias_in.shape.rank() != 1:
        dims = _normalized_shape(x, n.axis)
        bias_in = b.op("Reshape", bias_in, b.const(np.array([int(np.prod(dims))] if dims else [-1], np.int64), "bias_shape"), dtype=io)
    x_in, unflatten = _flatten_trailing(b, b.cast(x, io), n.axis, io)
    # Inputs in the plugin's order: x, gamma, then the residual and the bias where present
    # (has_residual / has_bias say which); TensorRT has no empty optional inputs.
    plugin_inputs = [x_in, gamma] if residual is None else [residual.inputs[0], gamma, residual.inputs[1]]
    if bias_in is not None:
        plugin_inputs.append(bias_in)
    plug = b.node(
        TRT_PLUGIN_NAME, plugin_inputs, domain=TRT_DOMAIN, num_outputs=2 if residual is not None else 1,
        plugin_version=TRT_PLUGIN_VERSION, plugin_namespace=TRT_PLUGIN_NAMESPACE, epsilon=n.eps,
        has_residual=int(residual is not None), has_bias=int(bias_in is not None),
    )
    y = plug.outputs[0]
    y.dtype, y.shape = io, x_in.shape
    y = b.cast(unflatten(y), n.out_dtype)
    old_nodes, old_values, new_values = [n.node], [n.node.outputs[0]], [y]
    if residual is not None:
        plug.outputs[1].dtype, plug.outputs[1].shape = x.dtype, x.shape
        old_nodes.append(residual)
        old_values.append(residual.outputs[0])
        new_values.append(plug.outputs[1])
    return Lowered(b.nodes, old_nodes, old_values, new_values, TRT_PLUGIN_NAME, residual is not None)


def _finish(b: _Builder, y: ir.Value, out_dtype: ir.DataType, bias: ir.Value | None) -> ir.Value:
    y = b.cast(y, out_dtype)
    if bias is not None:
        y = b.op("Add", y, b.cast(bias, out_dtype), dtype=out_dtype, shape=y.shape)
    return y


def _flatten_trailing(b: _Builder, x: ir.Value, axis: int, dtype: ir.DataType):
    """For ops that normalize only the last dim: merge the normalized dims into one, and
    give back a function that restores the original shape (ranks known or not)."""
    if axis == -1:
        return x, lambda y: y
    orig_shape = b.op("Shape", x, dtype=ir.DataType.INT64)
    leading = b.op("Shape", x, end=axis, dtype=ir.DataType.INT64)
    flat_shape = b.op("Concat", leading, b.const(np.array([-1], np.int64), "minus_one"), axis=0, dtype=ir.DataType.INT64)
    flat = b.op("Reshape", x, flat_shape, dtype=dtype)
    return flat, lambda y: b.op("Reshape", y, orig_shape, dtype=dtype, shape=x.shape)


def _decompose(b, x, scale, bias, eps, axis, stash, out_dtype) -> ir.Value:
    """The norm as primitive ops (opset-aware ReduceMean), computing in ``stash``."""
    opset = b.opset
    h = b.cast(x, stash) if x.dtype != stash else x
    axes = list(range(axis, 0))
    sq = b.op("Mul", h, h, dtype=stash)
    if opset >= 18:
        mean = b.op("ReduceMean", sq, b.const(np.array(axes, np.int64), "axes"), keepdims=1, dtype=stash)
    else:
        mean = b.op("ReduceMean", sq, axes=axes, keepdims=1, dtype=stash)
    var = b.op("Add", mean, b.const(np.array(eps, dtype=stash.numpy()), "eps"), dtype=stash)
    inv = b.op("Reciprocal", b.op("Sqrt", var, dtype=stash), dtype=stash)
    y = b.op("Mul", h, inv, dtype=stash, shape=x.shape)
    if scale is not None:
        y = b.op("Mul", y, b.cast(scale, stash), dtype=stash, shape=x.shape)
    if bias is not None:
        y = b.op("Add", y, b.cast(bias, stash), dtype=stash, shape=x.shape)
    return b.cast(y, out_dtype)
