"""onnxruntime's own forms on the KV-cache decoder (``--target ort``): attention and rotary
fusions, and weights read transposed.

After normexport's RMSNorm fusion, transformers' ONNX exporter pipeline for onnxruntime's CPU
provider (``transformers.exporters.onnxruntime_fusions.fuse_for_onnxruntime``, built on
onnxscript's ``ort_fusions.optimize_for_ort``) runs on the graph: RotaryEmbedding with its
cos/sin cache, MultiHeadAttention / GroupQueryAttention where they match and are faster on CPU,
skip norms. Its attention fusion matches the form transformers' exporter gives SDPA (an
additive mask, no IsNaN/Where), so the export runs under that exporter's torch patches
(``export_patches``). Without ``transformers.exporters`` (transformers < 5), onnxscript's
``optimize_for_ort`` runs alone.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import onnx_ir as ir

from normexport.fuse.registry import RECORDS
from normexport.logs import quiet_loggers

ORT_DOMAIN = "com.microsoft"
NORM_OPS = frozenset(op for t in RECORDS if t.onnxruntime_ops for op in t.ops)  # the fused norms the attention passes must keep


def op_counts(model: ir.Model, domain: str | None = None) -> dict[str, int]:
    """op_type -> nodes in the main graph and its subgraphs (of one domain if given)."""
    ops = (n.op_type for n in model.graph.all_nodes() if domain is None or n.domain == domain)
    return dict(collections.Counter(ops).most_common())


def export_patches():
    """transformers' exporter's torch patches (SDPA with an additive mask), or nothing."""
    try:
        import transformers.exporters.exporter_onnx  # noqa: F401  (registers the patches)
        from transformers.exporters.utils import apply_patches
    except ImportError:
        return contextlib.nullcontext()
    return apply_patches("onnx")


@dataclass
class AttentionFusion:
    """What the attention/rotary pass did: op-type counts before and after it."""

    pipeline: str
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    contrib_before: dict[str, int] = field(default_factory=dict)
    contrib_after: dict[str, int] = field(default_factory=dict)

    @property
    def nodes_before(self) -> int:
        return sum(self.before.values())

    @property
    def nodes_after(self) -> int:
        return sum(self.after.values())

    @property
    def gained(self) -> dict[str, int]:
        """onnxruntime contrib ops the pass added (e.g. RotaryEmbedding 4)."""
        return {op: n - self.contrib_before.get(op, 0) for op, n in self.contrib_after.items() if n > self.contrib_before.get(op, 0)}

    def recount(self, model: ir.Model) -> None:
        self.after, self.contrib_after = op_counts(model), op_counts(model, ORT_DOMAIN)

    def summary(self) -> str:
        fused = ", ".join(f"{op} x{n}" for op, n in self.gained.items()) or "nothing matched"
        return f"{fused}; {self.nodes_before} -> {self.nodes_after} nodes ({self.pipeline})"

    def to_json(self) -> dict:
        return {"pipeline": self.pipeline, "nodes_before": self.nodes_before, "nodes_after": self.nodes_after, "gained": self.gained, "ops_before": self.before, "ops_after": self.after}


def fuse_attention(model: ir.Model) -> AttentionFusion:
    """Apply the onnxruntime CPU fusions in place; norms already fused stay fused (checked by
    the caller with ``fused_norms``)."""
    before, contrib_before = op_counts(model), op_counts(model, ORT_DOMAIN)
    try:
        from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime
    except ImportError:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        with quiet_passes():
            optimize_for_ort(model)
        pipeline = "onnxscript optimize_for_ort"
    else:
        with quiet_passes():
            fuse_for_onnxruntime(model, "cpu")
        pipeline = "transformers.exporters fuse_for_onnxruntime (cpu), onnxscript ort_fusions"
    fusion = AttentionFusion(pipeline, before, contrib_before=contrib_before)
    fusion.recount(model)
    return fusion


def quiet_passes():
    """A shape inference the passes try and skip ("Model is left unchanged") logs a traceback."""
    return quiet_loggers(("onnx_ir", "onnxscript"))


def fused_norms(counts: dict[str, int]) -> int:
    return sum(counts.get(op, 0) for op in NORM_OPS)



def _transposed_weight_rule():
    from onnxscript.rewriter import pattern as orp
    from onnxscript.rewriter.ort_fusions.fused_matmul_rule_sets import TransposeMatMul2

    class TransposedWeightMatMul(TransposeMatMul2):
        """onnxscript's MatMul(x, Transpose(y)) -> FusedMatMul(x, y, transB=1), where y is a
        2-D initializer."""

        def check(self, context, x, y, transposed, **kw) -> orp.MatchResult:
            if not y.is_initializer() or y.const_value is None or len(y.const_value.shape) != 2:
                return orp.MatchResult().fail("not a 2-D initializer")
            return super().check(context, x, y, transposed, **kw)

    return TransposedWeightMatMul.rule()


def fuse_transposed_weights(model: ir.Model) -> int:
    """MatMul(x, Transpose(W)) with W a 2-D initializer, in place, as onnxruntime's
    FusedMatMul(x, W, transB=1); the number rewritten. torch.onnx folds the Transpose of a
    weight only one node reads; a weight shared with another op (a tied LM head, whose table
    the embedding Gather reads) keeps it, and onnxruntime then folds a transposed copy at
    load and packs that copy (seconds for a large vocabulary). FusedMatMul packs W directly.
    The product is the same."""
    from onnxscript.rewriter import rewrite

    before = op_counts(model, ORT_DOMAIN).get("FusedMatMul", 0)
    with quiet_passes():
        rewrite(model, pattern_rewrite_rules=[_transposed_weight_rule()])
    if ORT_DOMAIN not in model.opset_imports and any(n.domain == ORT_DOMAIN for n in model.graph):
        model.opset_imports[ORT_DOMAIN] = 1
    return op_counts(model, ORT_DOMAIN).get("FusedMatMul", 0) - before
