"""Importers of already-fused norms: each turns one target's fused op back into the internal
node (or, for nodes only TensorRT runs, counts it as fused), so that a fused model can be fused
again (same result), retargeted, repaired or decomposed. The target records (registry.py) say
which importer reads which op."""

from __future__ import annotations

import onnx_ir as ir

from normexport.fuse import patterns as P
from normexport.fuse.names import Names
from normexport.fuse.ops import MS_DOMAIN, RMS_NORMALIZATION, SIMPLIFIED_LN, SKIP_SIMPLIFIED_LN, TRT_DOMAIN, TRT_PLUGIN_NAME


def import_op(op_type: str):
    """An importer of a standard-signature norm op (X, scale; axis, epsilon, stash_type)."""

    def run(model: ir.Model, log: P.FusionLog, names: Names) -> None:
        P.ImportRule.rule(f"import-{op_type}", op_type=op_type, log=log).apply_to_model(model)

    return run


import_rms_normalization = import_op(RMS_NORMALIZATION)
import_simplified_ln = import_op(SIMPLIFIED_LN)


def import_ort(model: ir.Model, log: P.FusionLog, names: Names) -> None:
    import_skip_nodes(model, log, names)
    import_simplified_ln(model, log, names)


def count_plugin_nodes(model: ir.Model, log: P.FusionLog, names: Names) -> None:
    """TensorRT plugin nodes from an earlier fusion stay as they are (only TensorRT runs
    them), and count as fused norms."""
    for node in (n for g in model.graphs() for n in g):
        if node.domain == TRT_DOMAIN and node.op_type == TRT_PLUGIN_NAME:
            eps = node.attributes.get("epsilon")
            entry = P.FusedNorm(node.name, f"{TRT_PLUGIN_NAME} plugin (already fused)", float(eps.value) if eps else 1e-5, -1,
                                (node.outputs[0].dtype or ir.DataType.FLOAT).name, scale=True, op=TRT_PLUGIN_NAME,
                                module=node.metadata_props.get("normexport.module", ""), output=node.outputs[0].name)
            log.fused.append(entry)


def import_skip_nodes(model: ir.Model, log: P.FusionLog, names: Names) -> None:
    """onnxruntime's residual op (SKIP_SIMPLIFIED_LN) -> Add + the internal norm, so that a
    fused model can be fused again (same result), retargeted or decomposed. Its optional
    mean / inv_std_var outputs must be unused; its sum output becomes the Add's."""
    for graph in list(model.graphs()):
        _import_skip_nodes(graph, log, names)


def _import_skip_nodes(graph: ir.Graph, log: P.FusionLog, names: Names) -> None:
    for node in list(graph):
        if node.op_type != SKIP_SIMPLIFIED_LN or node.domain != MS_DOMAIN:
            continue
        outs = list(node.outputs)
        if any(o.uses() or o.is_graph_output() for o in outs[1:3]):
            continue
        a, b, gamma = node.inputs[:3]
        bias = node.inputs[3] if len(node.inputs) > 3 else None
        eps = node.attributes.get("epsilon")
        eps = float(eps.value) if eps is not None else 1e-12
        total = ir.Node("", "Add", [a, b], name=names.fresh(f"{node.name}_sum"))
        total.outputs[0].dtype, total.outputs[0].shape = a.dtype, a.shape
        new = [total]
        if bias is not None:
            with_bias = ir.Node("", "Add", [total.outputs[0], bias], name=names.fresh(f"{node.name}_sum_bias"))
            with_bias.outputs[0].dtype, with_bias.outputs[0].shape = a.dtype, a.shape
            new.append(with_bias)
        x = new[-1].outputs[0]
        y = outs[0]
        norm = ir.Node(
            P.INTERNAL_DOMAIN, P.INTERNAL_OP, [x, gamma],
            attributes=[ir.AttrFloat32("epsilon", eps), ir.AttrInt64("axis", -1), ir.AttrInt64("stash_type", int(ir.DataType.FLOAT)), ir.AttrInt64("out_dtype", int(y.dtype or a.dtype))],
            name=names.fresh(f"{node.name}_norm"),
        )
        norm.outputs[0].dtype, norm.outputs[0].shape = y.dtype or a.dtype, y.shape
        new.append(norm)
        old_values, new_values = [y], [norm.outputs[0]]
        if len(outs) > 3:
            old_values.append(outs[3])
            new_values.append(x)
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, old_values, new_values)
        module = node.metadata_props.get("normexport.module", "")
        log.record(norm.outputs[0], P.FusedNorm("", f"{SKIP_SIMPLIFIED_LN} (already fused)", eps, -1, (y.dtype or a.dtype).name, scale=True, module=module))
