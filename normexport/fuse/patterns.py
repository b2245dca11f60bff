"""The RMSNorm pattern, written like the maths, and the rules that grow it to a whole norm.

    y = x / sqrt(mean(x², normalized axes) + eps)          (the core)
      [cast to the output dtype] [· scale] [+ bias]       (the tail, absorbed one op at a time)

Fusion runs in two steps so that one pattern serves every target:
1. ``CoreRule`` matches the core in all its spellings (square as Pow(x, 2) or Mul(x, x); the
   root as Div(x, Sqrt), Mul(x, Reciprocal(Sqrt)), Mul(x, Div(1, Sqrt)) or Mul(x, Pow(., -0.5));
   fp32 round trips through Cast; either operand order) and replaces it with one *internal*
   node ``normexport.internal::RMSNorm(x, scale?, bias?)``. ``TailRules`` then absorb a Cast,
   a scale Mul and a bias Add that follow it, each only where the result is the same function.
   Norms already fused (the targets' own ops, read by importers.py) are imported into the
   same internal node, so every target sees one representation.
2. ``targets.lower`` rewrites each internal node into the target's op.

Every ``check`` returns a failure with a reason instead of a bare False: the reasons are what
``inspect`` and the fusion report show for the subgraphs left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from normexport.fuse.scales import reduced_scale
from normexport.fuse.values import attribute as _attr
from normexport.fuse.values import const_ints

INTERNAL_DOMAIN = "normexport.internal"
INTERNAL_OP = "RMSNorm"

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
# Precision order: a cast up this ladder loses nothing. fp16 and bf16 are not comparable.
_PRECISION = {ir.DataType.FLOAT16: 1, ir.DataType.BFLOAT16: 1, ir.DataType.FLOAT: 2, ir.DataType.DOUBLE: 3}


def widens(src: ir.DataType, dst: ir.DataType) -> bool:
    """True if casting src to dst is exact (dst holds every src value)."""
    if src == dst:
        return True
    return _PRECISION.get(src, 0) < _PRECISION.get(dst, 0)


def wider(a: ir.DataType, b: ir.DataType) -> ir.DataType:
    return b if _PRECISION.get(b, 0) > _PRECISION.get(a, 0) else a


def scalar_of(value: ir.Value | None) -> float | None:
    """The value of a constant with exactly one element (an initializer that is not also a
    graph input, or a Constant node's output), else None."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    arr = tensor.numpy()
    if arr.size != 1:
        return None
    return float(arr.reshape(()))


def module_path(node: ir.Node) -> str:
    """The PyTorch module a node was exported from: the dynamo exporter records its name
    scopes in metadata, the TorchScript exporter writes them into the node name."""
    import ast

    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            return scope_path(ast.literal_eval(scopes)[1:-1])
        except (ValueError, SyntaxError, TypeError):
            pass
    if node.name and node.name.startswith("/") and node.name.count("/") > 1:
        return ".".join(p for p in node.name.split("/")[1:-1] if p)
    return ""


def scope_path(scopes: list[str]) -> str:
    """One module path from the exporter's name scopes, outermost first. torch 2.13 writes
    each scope as the module's full path ("model", "model.layers.0", ...); a scope written as
    the module's own name ("model", "layers.0", ...) is taken too: a scope that extends the
    path so far replaces it, any other is appended to it."""
    path = ""
    for scope in scopes:
        if not scope:
            continue
        if path and (scope == path or scope.startswith(path + ".")):
            path = scope
        else:
            path = f"{path}.{scope}" if path else scope
    return path


@dataclass
class FusedNorm:
    """One norm the fusion produced: where it came from and what it computes."""

    name: str
    pattern: str
    epsilon: float
    axis: int
    dtype: str
    scale: bool = False
    bias: bool = False
    residual: bool = False
    op: str = ""
    module: str = ""  # the PyTorch module it came from, where the exporter recorded it
    output: str = ""  # name of the value holding the norm's result in the fused model


@dataclass
class FusionLog:
    """Collected while the rules run; the rules record into it instead of returning counts."""

    fused: list[FusedNorm] = field(default_factory=list)
    by_output: dict[int, FusedNorm] = field(default_factory=dict)  # id(internal value) -> entry
    shape_blocked: list[str] = field(default_factory=list)  # refusals for want of a shape or rank

    def record(self, value: ir.Value, entry: FusedNorm) -> None:
        self.fused.append(entry)
        self.by_output[id(value)] = entry

    def carry(self, old: ir.Value, new: ir.Value) -> FusedNorm | None:
        entry = self.by_output.pop(id(old), None)
        if entry is not None:
            self.by_output[id(new)] = entry
        return entry


def normalized_axes(mean_node: ir.Node, rank: int | None) -> tuple[int | None, str | None]:
    """The axis from which ReduceMean averages to the last dim (negative), or a reason why
    its axes are not a run of trailing dims."""
    if len(mean_node.inputs) > 1 and mean_node.inputs[1] is not None:
        axes = const_ints(mean_node.inputs[1])
        if axes is None:
            return None, "the mean's axes are not a constant"
    else:
        axes = _attr(mean_node, "axes")
        axes = list(axes) if axes is not None else []
    if not axes:
        if _attr(mean_node, "noop_with_empty_axes", 0):
            return None, "ReduceMean has no axes (noop_with_empty_axes=1)"
        if rank is None:
            return None, "the mean is over all axes of an input of unknown rank"
        axes = list(range(rank))
    if any(a >= 0 for a in axes) and rank is None:
        return None, f"the mean is over axes {axes} of an input of unknown rank"
    neg = sorted({a - rank if a >= 0 else a for a in axes})
    if neg != list(range(-len(neg), 0)):
        return None, f"the mean is over axes {axes}, not the last dims"
    return neg[0], None


def broadcast_reason(param: ir.Value, normalized: ir.Value, axis: int, what: str) -> str | None:
    """None if ``param`` broadcasts along the normalized axes only (shape [..1.., *dims]),
    else why not. Needs the shapes: unknown shapes are refused, never guessed."""
    ps, xs = param.shape, normalized.shape
    if ps is None or xs is None:
        return f"the {what}'s shape is unknown"
    k = -axis
    if ps.rank() > xs.rank():
        return f"the {what} (rank {ps.rank()}) broadcasts the output to a higher rank"
    dims_p = list(ps)
    if len(dims_p) < k:
        return f"the {what}'s shape {list(ps)} does not cover the normalized dims {list(xs)[axis:]}"
    for dp, dx in zip(dims_p[-k:], list(xs)[axis:]):
        if not isinstance(dp, int) or dp != dx:
            return f"the {what}'s shape {list(ps)} does not match the normalized dims {list(xs)[axis:]}"
    if any(d != 1 for d in dims_p[:-k]):
        return f"the {what}'s shape {list(ps)} varies along dims that are not normalized"
    return None


class _RecordsUnknownShapes:
    """Rules whose refusals for an unknown shape or rank are logged: without shape inference
    such a refusal may change the fusion, and the caller must know."""

    def check(self, context, **bindings):
        result = self._check(context, **bindings)
        if not result and "unknown" in (result.reason or ""):
            self._log.shape_blocked.append(result.reason)
        return result


# ---------------------------------------------------------------------------------------------
# The core


class CoreRule(_RecordsUnknownShapes, pattern.RewriteRuleClassBase):
    """x / sqrt(mean(x²) + eps), every spelling. ``root`` picks the op that divides (Div, or a
    Mul by the inverse root); OrValue covers the rest, commutation covers operand order."""

    def __init__(self, name: str, root: str, log: FusionLog, casts: bool = True):
        super().__init__(name)
        self._root = root
        self._log = log
        # casts=False is the fallback for an input Cast whose output is also used elsewhere
        # (the TorchScript exporter routes the residual stream through x.to(float32)): the
        # norm is then fused from the Cast's output, and the Cast stays for its other users.
        self._casts = casts

    def pattern(self, op, x, exponent, eps, one, neg_half):
        def maybe_cast(name):
            if not self._casts:
                return x
            # tag_var set because onnxscript 0.7's BacktrackingOr.clone (used by commute) fails without it
            return pattern.OrValue([op.Cast(x, _outputs=[f"{name}_cast"]), x], name=name, tag_var=f"{name}_is_cast", tag_values=[True, False])

        xa, xb, xc = maybe_cast("xa"), maybe_cast("xb"), maybe_cast("xc")
        square = pattern.OrValue([op.Pow(xa, exponent), op.Mul(xa, xb)], tag_var="square", tag_values=["pow", "mul"])
        mean = op.ReduceMean(square, _allow_other_inputs=True, _outputs=["mean"])
        # eps may be absent: torch's dynamo exporter drops `+ eps` for tiny eps (seen: 1e-8).
        # The graph then computes an RMSNorm with eps = 0, and so does the fused node.
        var = pattern.OrValue([op.Add(mean, eps), mean], tag_var="has_eps", tag_values=[True, False])
        rms = op.Sqrt(var)
        if self._root == "div":
            return op.Div(xc, rms)
        inverse = pattern.OrValue(
            [op.Reciprocal(rms), op.Div(one, rms), op.Pow(var, neg_half)],
            tag_var="inverse",
            tag_values=["reciprocal", "div", "pow"],
        )
        return op.Mul(xc, inverse)

    def _check(self, context, x, exponent, eps, one, neg_half, mean, xa=None, xc=None, xb=None, square=None, inverse=None, has_eps=True, **_):
        result = pattern.MatchResult()
        xa, xc = xa or x, xc or x
        if x.dtype is None or xa.dtype is None:
            return result.fail("the input's dtype is unknown", x)
        if x.dtype not in FLOAT_TYPES:
            return result.fail(f"the input is {x.dtype}, not a float type", x)
        compute = xa.dtype
        for v in (xb, xc):
            if v is not None and v.dtype != compute:
                return result.fail("the square and the division use the input in different precisions", v)
        if compute not in FLOAT_TYPES:
            return result.fail(f"the norm computes in {compute}, not a float type", xa)
        if not widens(x.dtype, compute):
            return result.fail(f"the norm computes in {compute.name}, narrower than its {x.dtype.name} input", xa)
        if square == "pow" and scalar_of(exponent) != 2.0:
            return result.fail("the square is Pow with an exponent other than 2", exponent)
        if inverse == "div" and scalar_of(one) != 1.0:
            return result.fail("the inverse root is Div(c, sqrt) with c != 1", one)
        if inverse == "pow" and scalar_of(neg_half) != -0.5:
            return result.fail("the inverse root is Pow with an exponent other than -0.5", neg_half)
        epsilon = scalar_of(eps) if has_eps else 0.0
        if epsilon is None:
            return result.fail("eps is not a constant scalar (a graph input or a computed value)", eps)
        if not np.isfinite(epsilon) or epsilon < 0:
            return result.fail(f"eps = {epsilon} is negative or not finite", eps)
        if has_eps and eps.shape is not None and x.shape is not None and eps.shape.rank() > x.shape.rank():
            return result.fail("eps has a higher rank than the input: it would broadcast the output", eps)
        mean_node = mean.producer()
        if _attr(mean_node, "keepdims", 1) != 1:
            return result.fail("ReduceMean has keepdims=0: the mean is not broadcast back over the normalized dims", mean_node)
        rank = x.shape.rank() if x.shape is not None else None
        axis, why = normalized_axes(mean_node, rank)
        if why:
            return result.fail(why, mean_node)
        producer = x.producer()
        if producer is not None and producer.op_type == "Sub" and producer.domain == "":
            sub_mean = producer.inputs[1].producer() if producer.inputs[1] is not None else None
            if sub_mean is not None and sub_mean.op_type == "ReduceMean" and sub_mean.inputs[0] is producer.inputs[0]:
                return result.fail("a LayerNorm: the mean is subtracted before the square (not an RMSNorm)", producer)
        self._epsilon, self._axis, self._compute = epsilon, axis, compute
        self._module = module_path(mean_node)
        cast = ", fp32 cast" if xa.producer() is not None and xa.producer().op_type == "Cast" else ""
        self._name = f"rms(square={square}, inverse={inverse or 'div-sqrt'}{cast}{'' if has_eps else ', no eps in graph'})"
        return result

    def rewrite(self, op, x, **_):
        stash = ir.DataType.DOUBLE if self._compute == ir.DataType.DOUBLE else ir.DataType.FLOAT
        out = op.RMSNorm(
            x,
            _domain=INTERNAL_DOMAIN,
            epsilon=self._epsilon,
            axis=self._axis,
            stash_type=int(stash),
            out_dtype=int(self._compute),
        )
        self._log.record(out, FusedNorm("", self._name, self._epsilon, self._axis, self._compute.name, module=self._module))
        return out


# ---------------------------------------------------------------------------------------------
# Norms already fused by the exporter


class ImportRule(_RecordsUnknownShapes, pattern.RewriteRuleClassBase):
    """A standard-signature norm op (importers.py names which) into the internal node, so that a
    fused model can be retargeted, repaired (mismatched X/scale dtypes) or fused again."""

    def __init__(self, name: str, op_type: str, log: FusionLog):
        super().__init__(name)
        self._op_type = op_type
        self._log = log

    def pattern(self, op, x, scale):
        return getattr(op, self._op_type)(x, scale, _outputs=["y"])

    def _check(self, context, x, scale, y, **_):
        result = pattern.MatchResult()
        node = y.producer()
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return result.fail(f"{self._op_type}'s inv_std_var output is used", node)
        axis = _attr(node, "axis", -1)
        if axis >= 0:
            if x.shape is None:
                return result.fail(f"{self._op_type} has a positive axis and an input of unknown rank", node)
            axis -= x.shape.rank()
        if x.dtype is None or y.dtype is None:
            return result.fail(f"{self._op_type}'s input or output dtype is unknown", node)
        if x.dtype not in FLOAT_TYPES or y.dtype not in FLOAT_TYPES:
            return result.fail(f"{self._op_type} with non-float input or output", node)
        self._scale_form, self._reduced = "scale", None
        why = broadcast_reason(scale, x, axis, "scale")
        if why and "unknown" in why:
            self._log.shape_blocked.append(why)
        if why:
            # The scale spans dims that are not normalized (the op allows any scale that
            # broadcasts to x): reduced to the normalized shape where it is constant along
            # them, else the op is a norm followed by a Mul by the scale, and stays so.
            reduced = reduced_scale(scale, x, axis)
            if reduced is not None:
                self._scale_form, self._reduced = "reduced", reduced[1]
            elif scale.dtype != y.dtype:
                return result.fail(f"{self._op_type}'s scale ({scale.dtype}) broadcasts along unnormalized dims and differs from its output's dtype", node)
            else:
                self._scale_form = "mul"
        self._axis = axis
        self._epsilon = float(_attr(node, "epsilon", 1e-5))
        self._stash = int(_attr(node, "stash_type", 1))
        self._out = y.dtype
        self._module = node.metadata_props.get("normexport.module") or module_path(node)
        return result

    def rewrite(self, op, x, scale, **_):
        stash = self._stash if self._stash in (int(ir.DataType.FLOAT), int(ir.DataType.DOUBLE)) else int(ir.DataType.FLOAT)
        norm_scale = scale
        if self._scale_form == "reduced":  # all ones (no scale) or the values of one row
            norm_scale = None if self._reduced is None else op.Constant(value=ir.tensor(self._reduced.astype(scale.dtype.numpy())))
        elif self._scale_form == "mul":
            norm_scale = None
        out = op.RMSNorm(
            x, norm_scale, _domain=INTERNAL_DOMAIN, epsilon=self._epsilon, axis=self._axis, stash_type=stash, out_dtype=int(self._out)
        )
        pattern_name = f"{self._op_type} (already fused)" + {"reduced": ", scale reduced to the normalized shape", "mul": ", scale kept as a Mul"}.get(self._scale_form, "")
        self._log.record(out, FusedNorm("", pattern_name, self._epsilon, self._axis, self._out.name, scale=self._scale_form != "mul" and norm_scale is not None, module=self._module))
        return op.Mul(out, scale) if self._scale_form == "mul" else out


# ---------------------------------------------------------------------------------------------
# The tail


def _internal_parts(value: ir.Value):
    node = value.producer()
    inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
    attrs = {k: a.value for k, a in node.attributes.items()}
    return node, inputs[0], inputs[1], inputs[2], attrs


class CastTailRule(pattern.RewriteRuleClassBase):
    """Cast(norm) -> norm with that output dtype: the cast already was the last step."""

    def __init__(self, name: str, log: FusionLog):
        super().__init__(name)
        self._log = log

    def pattern(self, op, n):
        return op.Cast(op.RMSNorm(_domain=INTERNAL_DOMAIN, _allow_other_inputs=True, _outputs=["n"]), _outputs=["y"])

    def check(self, context, n, y, **_):
        result = pattern.MatchResult()
        if y.dtype is None:
            self._log.shape_blocked.append("the dtype of a Cast after a norm is unknown")
            return result.fail("the dtype of the Cast's output is unknown", y)
        if y.dtype not in FLOAT_TYPES:
            return result.fail(f"the norm's output is cast to {y.dtype}, not a float type", y)
        return result

    def rewrite(self, op, n, y, **_):
        _, x, scale, bias, attrs = _internal_parts(n)
        attrs["out_dtype"] = int(y.dtype)
        out = op.RMSNorm(x, scale, bias, _domain=INTERNAL_DOMAIN, **attrs)
        entry = self._log.carry(n, out)
        if entry is not None:
            entry.dtype = y.dtype.name
        return out


class AffineTailRule(_RecordsUnknownShapes, pattern.RewriteRuleClassBase):
    """Mul(norm, scale) or Add(norm, bias) -> the norm with that scale / bias, where the
    parameter broadcasts along the normalized dims only (else the Mul/Add stays)."""

    def __init__(self, name: str, kind: str, log: FusionLog):
        super().__init__(name)
        self._kind = kind  # "scale" | "bias"
        self._log = log

    def pattern(self, op, p):
        n = op.RMSNorm(_domain=INTERNAL_DOMAIN, _allow_other_inputs=True, _outputs=["n"])
        return op.Mul(n, p) if self._kind == "scale" else op.Add(n, p)

    def _check(self, context, n, p, **_):
        result = pattern.MatchResult()
        _, _, scale, bias, attrs = _internal_parts(n)
        if bias is not None:
            return result.fail(f"a {self._kind} after the bias", p)
        if self._kind == "scale" and scale is not None:
            return result.fail("a second scale", p)
        if p.dtype is None or n.dtype is None:
            return result.fail(f"the {self._kind}'s or the norm's dtype is unknown", p)
        if p.dtype != n.dtype:
            return result.fail(f"the {self._kind} is {p.dtype}, the norm {n.dtype}", p)
        why = broadcast_reason(p, n, attrs["axis"], self._kind)
        if why:
            return result.fail(why, p)
        return result

    def rewrite(self, op, n, p, **_):
        _, x, scale, bias, attrs = _internal_parts(n)
        if self._kind == "scale":
            scale = p
        else:
            bias = p
        out = op.RMSNorm(x, scale, bias, _domain=INTERNAL_DOMAIN, **attrs)
        entry = self._log.carry(n, out)
        if entry is not None:
            setattr(entry, self._kind, True)
        return out


def core_rules(log: FusionLog) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [
            CoreRule.rule("rms-core-mul", root="mul", log=log),
            CoreRule.rule("rms-core-div", root="div", log=log),
            CoreRule.rule("rms-core-mul-shared-cast", root="mul", log=log, casts=False),
            CoreRule.rule("rms-core-div-shared-cast", root="div", log=log, casts=False),
        ],
        commute=True,
    )


def tail_rules(log: FusionLog) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [
            CastTailRule.rule("tail-cast", log=log),
            AffineTailRule.rule("tail-scale", kind="scale", log=log),
            AffineTailRule.rule("tail-bias", kind="bias", log=log),
        ],
        commute=True,
    )
