"""``normexport ln2rms``: turn a trained Pre-LN transformer into a Pre-RMSNorm one (issue 6).

Jiang et al., NeurIPS 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers". Write
``C = I - 11ᵀ/d`` for the centring matrix over the hidden dim (``C x = x - mean(x)``).

* ``LN(x) = LN(C x)``: a LayerNorm only ever sees the centred stream, and on a zero-mean
  input ``LN(x) = γ ⊙ x / sqrt(mean(x²) + eps) + β = RMSNorm(x)`` exactly (same eps).
* The residual stream of a Pre-LN model is a sum of terms, each an embedding row or the
  output of a branch's last linear layer: ``x = E[ids] + P[pos] + Σ_k (W_k h_k + b_k)``.
  Centring is linear, so ``C x = (C E)[ids] + (C P)[pos] + Σ_k ((C W_k) h_k + C b_k)``:
  subtract each embedding row's mean (over the hidden dim), subtract from every output
  projection the mean over its *output* features (``W -= W.mean(0)`` for nn.Linear's
  [out, in] weight, ``W -= W.mean(1)`` for HF Conv1D's [in, out]) and its bias's mean.
  The branches' inputs ``h_k`` are computed from ``LN(stream)`` only, so they are unchanged,
  and by induction every stream value of the new model is exactly ``C`` times the old one.
* Every norm reads the stream, so every norm output, the final one included, is unchanged:
  the LM head reads the final norm's output ``y`` (not zero-mean: ``γ ⊙ x̂ + β``), so it must
  keep the *original* table. A tied head is untied first, with a copy of ``E``:
  ``y · (C E)_v = y · E_v - mean(E_v) Σ_i y_i`` would shift each vocabulary entry by a
  different amount, so keeping ``Eᵀ`` is the only choice that keeps the logits equal.
* ``--fold-affine``: ``W (γ ⊙ x̂ + β) + b = (W diag γ) x̂ + (b + W β)``, done only where every
  consumer of the norm's output is a linear layer that reads nothing else.

The structure is recognised on the ``torch.export`` graph (which traces HF models that
``torch.fx.symbolic_trace`` cannot), so every claim above is checked on the dataflow, not
guessed from module names. Anything else is refused with the reason (NormexportError).
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import operator
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from normexport.errors import NormexportError, ValidationFailed
from normexport.pt2 import load_exported

__all__ = ["RMSNorm", "Ln2RmsReport", "ln2rms", "export_archive", "ln2rms_command", "REL_TOL"]

REL_TOL = 1e-4  # max |Δlogits| / max |logits|, fp32

aten = torch.ops.aten


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x², -1) + eps)``, then ``* weight`` and ``+ bias`` when present.

    Written as the explicit formula on purpose: ``torch.onnx.export`` turns it into the chain
    Pow → ReduceMean → Add → Sqrt → Reciprocal → Mul [→ Mul weight] [→ Add bias] at every
    opset, which is the chain ``normexport.fuse`` (and onnxruntime's
    SimplifiedLayerNormalization fusion) recognise. ``torch.nn.RMSNorm`` gives the same chain
    at opset 18 today, but becomes a native RMSNormalization node from opset 23 on, upcasts
    differently in fp16 and has no bias: the explicit module exports the same way everywhere.
    """

    def __init__(self, normalized_shape: int, eps: float, weight=None, bias=None):
        super().__init__()
        self.normalized_shape = (int(normalized_shape),)
        self.eps = float(eps)
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, weight={self.weight is not None}, "
            f"bias={self.bias is not None}"
        )


@dataclass
class Ln2RmsReport:
    blocks_converted: int = 0
    layer_norms_replaced: int = 0
    folded: int = 0
    embeddings_recentered: int = 0
    head_untied: bool = False
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    passed: bool = False
    notes: list[str] = field(default_factory=list)
    # detail
    residual_branches: int = 0
    projections_recentered: int = 0
    tolerance: float = REL_TOL
    samples: int = 0
    replaced_norms: list[str] = field(default_factory=list)
    folded_norms: list[str] = field(default_factory=list)
    recentered_embeddings: list[str] = field(default_factory=list)
    recentered_projections: list[str] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    index_ranges: dict = field(default_factory=dict)  # integer input -> draws in [0, high)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("max_abs", "max_rel"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None
        return d


# =============================================================================================
# Graph vocabulary (aten ops of a torch.export graph)

_LAYER_NORM = {aten.layer_norm.default, aten.native_layer_norm.default}
_ADD = {aten.add.Tensor}
_META_USERS = {
    aten.sym_size.int,
    aten.sym_stride.int,
    aten.sym_numel.default,
    aten.sym_storage_offset.default,
    aten._assert_tensor_metadata.default,
}
# Ops that act on every hidden-dim row the same linear way, keeping the last dim whole:
# they commute with centring, so a centred stream stays centred through them.
_VIEWS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.detach.default,
    aten.expand.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.type_as.default,
}
_DIM_OPS = {aten.slice.Tensor, aten.select.int}  # (x, dim, ...): fine unless dim is the last
_PERMUTES = {aten.transpose.int, aten.permute.default}
_SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_DROPOUT = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _rank_last(n) -> tuple[int | None, Any]:
    v = _val(n)
    if isinstance(v, torch.Tensor):
        return v.dim(), v.shape[-1] if v.dim() else None
    return None, None


def _is_number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _dropout_active(n: fx.Node) -> bool:
    if n.target not in _DROPOUT:
        return False
    p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
    train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)
    return bool(train) and bool(p)


def _passthrough_input(n: fx.Node) -> fx.Node | None:
    """The stream input of ``n`` if ``n`` maps every hidden-dim row linearly and row-wise."""
    if n.op != "call_function" or not n.args:
        return None
    if n.target in (aten.mul.Tensor, aten.mul.Scalar) and len(n.args) == 2 and _is_number(n.args[0]):
        n_args = (n.args[1], n.args[0])  # 2.0 * x
    else:
        n_args = tuple(n.args)
    if not isinstance(n_args[0], fx.Node):
        return None
    x = n_args[0]
    rank_in, last_in = _rank_last(x)
    rank_out, last_out = _rank_last(n)
    if rank_in is None or rank_out is None or rank_in == 0 or rank_out == 0:
        return None
    if n.target in _DROPOUT:
        if _dropout_active(n):
            return None
        return x if n.target is not aten.native_dropout.default else None
    same_last = last_in == last_out
    if n.target in _VIEWS:
        if n.target in (aten.unsqueeze.default,):
            d = n.args[1] % (rank_in + 1)
            return x if d != rank_in and same_last else None
        if n.target in (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default):
            ok = isinstance(_val(n), torch.Tensor) and _val(n).dtype.is_floating_point
            return x if ok and same_last else None
        return x if same_last else None
    if n.target in _DIM_OPS:
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        return x if d % rank_in != rank_in - 1 and same_last else None
    if n.target in _PERMUTES:
        if n.target is aten.transpose.int:
            dims = [n.args[1] % rank_in, n.args[2] % rank_in]
            return x if rank_in - 1 not in dims else None
        perm = [p % rank_in for p in n.args[1]]
        return x if perm[-1] == rank_in - 1 else None
    if n.target in _SCALE_OPS and len(n_args) == 2 and _is_number(n_args[1]):
        return x
    return None


# =============================================================================================
# Analysis


@dataclass
class _Projection:
    node: fx.Node
    x: fx.Node
    weight: fx.Node  # placeholder
    bias: fx.Node | None  # placeholder
    out_dim: int  # the weight dim that indexes output features: 0 for linear, 1 for addmm


@dataclass
class _Plan:
    stream: set = field(default_factory=set)
    embeddings: dict = field(default_factory=dict)  # id(tensor) -> (fqn, tensor, module)
    projections: dict = field(default_factory=dict)  # id(weight) -> (path, weight, bias, out_dim)
    residual_adds: list = field(default_factory=list)
    norms: dict = field(default_factory=dict)  # id(LayerNorm) -> (path, module, [ln nodes])
    untie: list = field(default_factory=list)  # (owner path, owner module, attr, tensor)
    folds: dict = field(default_factory=dict)  # id(LayerNorm) -> [(path, module, out_dim)]
    notes: list = field(default_factory=list)


class _Graph:
    """A torch.export graph of the model plus the maps back to its modules and parameters."""

    def __init__(self, model: nn.Module, example_inputs: dict):
        self.model = model
        args, kwargs = _bind(model, example_inputs)
        try:
            with torch.no_grad():
                ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception as e:  # noqa: BLE001 - any tracing failure becomes a refusal
            raise NormexportError(
                f"cannot trace the model with torch.export ({type(e).__name__}: {_first_line(e)})",
                "ln2rms must see the dataflow: make forward(**example_inputs) exportable "
                "(no data-dependent Python control flow), or convert a traceable wrapper",
            ) from None
        self.ep = ep
        self.graph = ep.graph
        self.param_of: dict[fx.Node, tuple[str, torch.Tensor]] = {}
        sig = ep.graph_signature
        for node in self.graph.nodes:
            if node.op != "placeholder":
                continue
            fqn = sig.inputs_to_parameters.get(node.name)
            if fqn is not None:
                self.param_of[node] = (fqn, model.get_parameter(fqn))
        self.modules = dict(model.named_modules(remove_duplicate=False))

    # ---- mapping nodes back to modules -----------------------------------------------------

    def stack(self, n: fx.Node) -> list[tuple[str, nn.Module | None]]:
        """The modules ``n`` was traced in, innermost first."""
        out = []
        for path, _type in reversed(list((n.meta.get("nn_module_stack") or {}).values())):
            out.append((path, self._resolve(path)))
        return out

    def _resolve(self, path: str) -> nn.Module | None:
        if path in self.modules:
            return self.modules[path]
        for prefix in ("L['self'].", "L__self__.", "self."):
            if path.startswith(prefix) and path[len(prefix):] in self.modules:
                return self.modules[path[len(prefix):]]
        return None

    def where(self, n: fx.Node) -> str:
        st = self.stack(n)
        return st[0][0] if st and st[0][0] else "<model>"

    def owner(self, n: fx.Node, types) -> tuple[str, nn.Module] | tuple[None, None]:
        for path, mod in self.stack(n):
            if mod is not None and isinstance(mod, types):
                return path, mod
        return None, None

    def owner_of_param(self, n: fx.Node, tensor: torch.Tensor) -> tuple[str, nn.Module, str] | None:
        """The innermost module on ``n``'s stack that holds ``tensor`` as its own parameter."""
        for path, mod in self.stack(n):
            if mod is None:
                continue
            for attr, p in mod._parameters.items():
                if p is tensor:
                    return path, mod, attr
        return None

    def param(self, a) -> torch.Tensor | None:
        return self.param_of[a][1] if isinstance(a, fx.Node) and a in self.param_of else None

    def fqn(self, a) -> str:
        return self.param_of[a][0]

    def placeholders_of(self, tensor: torch.Tensor) -> list[fx.Node]:
        return [n for n, (_, t) in self.param_of.items() if t is tensor]

    # ---- op recognisers ----------------------------------------------------------------------

    def projection(self, n: fx.Node) -> _Projection | None:
        """``n`` is a linear layer with parameter weights: aten.linear or addmm (HF Conv1D)."""
        if n.op != "call_function":
            return None
        if n.target is aten.linear.default:
            x, w = n.args[0], n.args[1]
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            out_dim = 0
        elif n.target is aten.addmm.default:
            if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
                return None
            b, x, w = n.args[0], n.args[1], n.args[2]
            out_dim = 1
        else:
            return None
        if self.param(w) is None or self.param(w).dim() != 2:
            return None
        if b is not None and self.param(b) is None:
            return None
        return _Projection(n, x, w, b, out_dim)

    def embedding(self, n: fx.Node) -> torch.Tensor | None:
        if n.op == "call_function" and n.target is aten.embedding.default:
            return self.param(n.args[0])
        return None

    def is_norm(self, n: fx.Node) -> bool:
        return n.op == "call_function" and n.target in _LAYER_NORM

    def norm_outputs(self, n: fx.Node) -> list[fx.Node]:
        if n.target is aten.native_layer_norm.default:
            return [u for u in n.users if u.target is operator.getitem and u.args[1] == 0]
        return [n]

    def norm_output_of(self, n: fx.Node) -> fx.Node | None:
        """The LayerNorm op whose (first) output ``n`` is, else None."""
        if self.is_norm(n) and n.target is aten.layer_norm.default:
            return n
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            if self.is_norm(n.args[0]) and n.args[1] == 0:
                return n.args[0]
        return None


def _describe(g: _Graph, n: fx.Node) -> str:
    """``n`` in words: "LayerNorm h.0.ln_1", "linear layer h.0.mlp.c_fc", "aten::gelu in h.0.mlp"."""
    if n.op == "placeholder":
        return f"model input '{n.name}'"
    if n.op == "output":
        return "the model output"
    if g.is_norm(n):
        path = g.owner(n, nn.LayerNorm)[0]
        if path is not None:
            return f"LayerNorm {path}"
    proj = g.projection(n)
    if proj is not None:
        o = g.owner_of_param(n, g.param(proj.weight))
        return f"linear layer {o[0] if o else g.fqn(proj.weight)}"
    target = getattr(n.target, "__name__", str(n.target))
    if hasattr(n.target, "name") and callable(n.target.name):
        target = n.target.name()
    return f"{target} in {g.where(n)}"


def _analyse(model: nn.Module, example_inputs: dict, fold_affine: bool) -> tuple[_Graph, _Plan]:
    g = _Graph(model, example_inputs)
    plan = _Plan()
    nodes = list(g.graph.nodes)

    for n in nodes:
        if n.op == "call_function" and _dropout_active(n):
            raise NormexportError(
                f"dropout in training mode ({_describe(g, n)}): the model is not deterministic",
                "put the model in eval mode (model.eval()) before converting",
            )

    norms = [n for n in nodes if g.is_norm(n)]
    if not norms:
        raise NormexportError(
            "no LayerNorm found in the traced model: nothing to convert",
            "ln2rms converts Pre-LN transformers (nn.LayerNorm before each branch)",
        )

    # ---- 1. the residual stream: everything a LayerNorm reads, traced backwards ---------------
    stream: set[fx.Node] = set()
    proj_nodes: list[_Projection] = []
    emb_nodes: list[fx.Node] = []
    todo: list[tuple[fx.Node, fx.Node | None, fx.Node]] = [(ln.args[0], None, ln) for ln in norms]
    while todo:
        n, via_add, reader = todo.pop()
        if n in stream:
            continue
        if not isinstance(n, fx.Node):
            raise NormexportError(
                f"a constant is added into the residual stream at {_describe(g, via_add or reader)}",
                "only embeddings and branch outputs may enter the stream (a constant breaks its zero mean)",
            )
        stream.add(n)
        if g.embedding(n) is not None:
            emb_nodes.append(n)
            continue
        proj = g.projection(n)
        if proj is not None:
            proj_nodes.append(proj)
            continue
        src = _passthrough_input(n)
        if src is not None:
            todo.append((src, via_add, reader))
            continue
        if n.op == "call_function" and n.target in _ADD and n.kwargs.get("alpha", 1) == 1 and len(n.args) == 2:
            plan.residual_adds.append(n)
            todo.extend((a, n, reader) for a in n.args)
            continue
        # Refusals, most specific first.
        ln_in = g.norm_output_of(n)
        if ln_in is not None:
            raise NormexportError(
                f"Post-LN: the residual stream read by {_describe(g, reader)} is the output of "
                f"{_describe(g, ln_in)} (the norm comes after the residual add)",
                "ln2rms converts Pre-LN transformers only (x = x + f(LN(x))); a Post-LN model "
                "cannot be made to compute the same function with RMSNorm",
            )
        if via_add is None:
            raise NormexportError(
                f"{_describe(g, reader)} reads {_describe(g, n)}, not the residual stream",
                "ln2rms converts norms that read the residual stream (Pre-LN) only",
            )
        raise NormexportError(
            f"the branch added into the residual stream at {_describe(g, via_add)} ends in "
            f"{_describe(g, n)}, not in a linear layer",
            "every residual branch must end in its output projection (nn.Linear / HF Conv1D) "
            "so that the projection can be recentred",
        )

    # ---- 2. every read of the stream goes through a LayerNorm --------------------------------
    leaves = set(emb_nodes) | {p.node for p in proj_nodes}  # start the stream, do not read it
    order = {n: i for i, n in enumerate(nodes)}
    for n in sorted(stream, key=order.__getitem__):
        for u in n.users:
            if (u in stream and u not in leaves) or u.target in _META_USERS:
                continue
            if g.is_norm(u) and u.args[0] is n:
                continue
            proj = g.projection(u)
            if proj is not None and n in (proj.weight, proj.bias):
                continue
            if u.op == "output":
                raise NormexportError(
                    f"the residual stream ({_describe(g, n)}) is a model output, without a LayerNorm",
                    "return only what is computed after the final LayerNorm (e.g. the logits)",
                )
            raise NormexportError(
                f"the residual stream is read without a LayerNorm by {_describe(g, u)}",
                "in a Pre-LN transformer every branch reads the stream through a LayerNorm; "
                "removing the stream's mean would change what this op computes",
            )
    plan.stream = stream

    # ---- 3. LayerNorm modules -----------------------------------------------------------------
    for ln in norms:
        path, mod = g.owner(ln, nn.LayerNorm)
        if mod is None:
            raise NormexportError(
                f"a functional layer_norm in {g.where(ln)} is not an nn.LayerNorm module",
                "ln2rms replaces nn.LayerNorm modules; TorchScript and torch.export archives have none, "
                "so give the nn.Module (state_dict + --factory, or a trusted pickle)",
            )
        shape = list(ln.args[1])
        rank, last = _rank_last(ln.args[0])
        if len(shape) != 1 or shape[0] != last:
            raise NormexportError(
                f"LayerNorm {path} normalises {shape}, not the last (hidden) dim",
                "ln2rms converts LayerNorms over the hidden dim only",
            )
        entry = plan.norms.setdefault(id(mod), (path, mod, []))
        entry[2].append(ln)

    # ---- 4. embeddings, projections and who else uses their parameters ------------------------
    emb_nodes.sort(key=order.__getitem__)
    proj_nodes.sort(key=lambda p: order[p.node])
    for n in emb_nodes:
        t = g.embedding(n)
        owner = g.owner_of_param(n, t)
        if owner is not None and isinstance(owner[1], nn.Embedding) and owner[1].max_norm is not None:
            raise NormexportError(
                f"embedding {owner[0]} uses max_norm: recentring its rows would change the renormalisation",
                "drop max_norm (it only matters in training)",
            )
        name = f"{owner[0]}.{owner[2]}" if owner is not None else g.fqn(n.args[0])
        plan.embeddings.setdefault(id(t), (name, t))
    for p in proj_nodes:
        w = g.param(p.weight)
        b = g.param(p.bias) if p.bias is not None else None
        prev = plan.projections.get(id(w))
        if prev is not None and (prev[3] != p.out_dim or prev[2] is not b):
            raise NormexportError(
                f"weight {g.fqn(p.weight)} is used as two different projections",
                "ln2rms needs each output projection to be one linear layer",
            )
        owner = g.owner_of_param(p.node, w)
        path = owner[0] if owner else g.fqn(p.weight).rsplit(".", 1)[0]
        plan.projections[id(w)] = (path, w, b, p.out_dim)

    emb_tensors = {k: v[1] for k, v in plan.embeddings.items()}
    proj_tensors = {}
    for _, w, b, _ in plan.projections.values():
        proj_tensors[id(w)] = w
        if b is not None:
            proj_tensors[id(b)] = b
    if set(emb_tensors) & set(proj_tensors):
        raise NormexportError(
            "a tensor is both an embedding table and a branch's output projection",
            "ln2rms cannot recentre it for both roles",
        )

    # Module-level ties of an embedding table (e.g. lm_head.weight = wte.weight): untie.
    embedding_owners = set()
    for n in emb_nodes:
        o = g.owner_of_param(n, g.embedding(n))
        if o is not None:
            embedding_owners.add(id(o[1]))
    for key, t in emb_tensors.items():
        for path, mod in g.model.named_modules(remove_duplicate=False):
            if id(mod) in embedding_owners:
                continue
            for attr, p in mod._parameters.items():
                if p is t and not any(u[1] is mod and u[2] == attr for u in plan.untie):
                    plan.untie.append((path, mod, attr, t))
    untied_owners = {(id(u[1]), u[2]) for u in plan.untie}

    for key, t in {**emb_tensors, **proj_tensors}.items():
        for ph in g.placeholders_of(t):
            for u in ph.users:
                if u in stream:
                    if (g.embedding(u) is t and u.args[0] is ph) or (
                        g.projection(u) is not None and ph in (g.projection(u).weight, g.projection(u).bias)
                    ):
                        continue
                o = g.owner_of_param(u, t)
                if key in emb_tensors and o is not None and (id(o[1]), o[2]) in untied_owners:
                    continue  # a tied head: it will get its own copy of the original table
                what = "embedding table" if key in emb_tensors else "output projection parameter"
                raise NormexportError(
                    f"{what} {g.fqn(ph)} is also used by {_describe(g, u)}, which would see the recentred values",
                    "ln2rms can untie a module that shares the table (like a tied LM head), "
                    "not a functional use of it; use the parameter through its own module",
                )

    # ---- 5. which LayerNorm affines can fold into the following linear layers ------------------
    if fold_affine:
        _plan_folds(g, plan)
    return g, plan


def _plan_folds(g: _Graph, plan: _Plan) -> None:
    consumers_of: dict[int, list] = {}  # id(LayerNorm) -> projections fed
    fed_by: dict[int, set] = {}  # id(weight) -> ids of LayerNorms feeding it
    blocked: dict[int, str] = {}
    for key, (path, mod, lns) in plan.norms.items():
        if mod.weight is None and mod.bias is None:
            continue
        found = []
        for ln in lns:
            todo = list(g.norm_outputs(ln))
            if ln.target is aten.native_layer_norm.default and len(todo) != 1:
                blocked[key] = "its output is used in an unusual way"
            while todo:
                v = todo.pop()
                for u in v.users:
                    if u.target in _META_USERS:
                        continue
                    proj = g.projection(u)
                    if proj is not None and proj.x is v and v not in (proj.weight, proj.bias):
                        found.append(proj)
                        continue
                    if _passthrough_input(u) is v and u.target not in _SCALE_OPS:
                        todo.append(u)
                        continue
                    blocked.setdefault(key, f"its output also feeds {_describe(g, u)}")
        consumers_of[key] = found
        for proj in found:
            fed_by.setdefault(id(g.param(proj.weight)), set()).add(key)
    # A projection may take only this norm's output, and its weight must not be shared.
    untied = {id(u[1]) for u in plan.untie}
    for key, found in consumers_of.items():
        if key in blocked:
            continue
        mine = {p.node for p in found}
        for proj in found:
            w = g.param(proj.weight)
            owner = g.owner_of_param(proj.node, w)
            if owner is None or owner[2] != "weight":
                blocked[key] = f"weight {g.fqn(proj.weight)} is used functionally, not as a module's weight"
                break
            # every call of this layer (uses of its weight attributed to it) reads this norm
            calls = [
                u
                for ph in g.placeholders_of(w)
                for u in ph.users
                if (o := g.owner_of_param(u, w)) is not None and o[1] is owner[1]
            ]
            if fed_by.get(id(w)) != {key} or any(u not in mine for u in calls):
                blocked[key] = f"linear layer {owner[0]} also reads other inputs"
                break
            sharers = {
                id(m) for _, m in g.model.named_modules(remove_duplicate=False) for q in m._parameters.values() if q is w
            }
            if sharers - {id(owner[1])} and id(owner[1]) not in untied:
                blocked[key] = f"the weight of {owner[0]} is shared with another module"
                break
            bias_slot = owner[1]._parameters.get("bias", "absent")
            if isinstance(bias_slot, str):
                blocked[key] = f"linear layer {owner[0]} has no bias slot to take the folded shift"
                break
            if proj.bias is not None and bias_slot is not g.param(proj.bias):
                blocked[key] = f"bias {g.fqn(proj.bias)} is not {owner[0]}.bias"
                break
    for key, (path, mod, lns) in plan.norms.items():
        if mod.weight is None and mod.bias is None:
            continue
        if key in blocked:
            plan.notes.append(f"{path}: affine kept on the RMSNorm, not folded ({blocked[key]})")
            continue
        targets, seen = [], set()
        for proj in consumers_of[key]:
            owner = g.owner_of_param(proj.node, g.param(proj.weight))
            if id(owner[1]) not in seen:
                seen.add(id(owner[1]))
                targets.append((owner[0], owner[1], proj.out_dim))
        if targets:
            plan.folds[key] = targets


# =============================================================================================
# Conversion


def _center_(t: torch.Tensor, dim: int) -> None:
    with torch.no_grad():
        t64 = t.detach().to(torch.float64)
        t.copy_((t64 - t64.mean(dim=dim, keepdim=True)).to(t.dtype))


def _apply(model: nn.Module, g: _Graph, plan: _Plan, report: Ln2RmsReport) -> None:
    # 1. untie first: the head keeps a copy of the ORIGINAL table (see the module docstring).
    for path, mod, attr, t in plan.untie:
        setattr(mod, attr, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
        report.untied.append(f"{path}.{attr}" if path else attr)
    report.head_untied = bool(plan.untie)

    # 2. fold γ, β into the consumers:  W (γ ⊙ x̂ + β) + b = (W diag γ) x̂ + (b + W β).
    folded_ids = set()
    for key, targets in plan.folds.items():
        path, ln, _ = plan.norms[key]
        gamma = ln.weight.detach().to(torch.float64) if ln.weight is not None else None
        beta = ln.bias.detach().to(torch.float64) if getattr(ln, "bias", None) is not None else None
        with torch.no_grad():
            for _, lin, out_dim in targets:
                w = lin.weight
                w64 = w.detach().to(torch.float64)
                shift = None
                if beta is not None:
                    shift = (w64 @ beta) if out_dim == 0 else (beta @ w64)
                if gamma is not None:
                    w.copy_((w64 * (gamma[None, :] if out_dim == 0 else gamma[:, None])).to(w.dtype))
                if shift is not None:
                    if lin.bias is None:
                        lin.bias = nn.Parameter(shift.to(w.dtype), requires_grad=w.requires_grad)
                    else:
                        lin.bias.copy_((lin.bias.detach().to(torch.float64) + shift).to(lin.bias.dtype))
        folded_ids.add(key)
        report.folded_norms.append(path)
    report.folded = len(folded_ids)

    # 3. recentre the embedding tables (rows over the hidden dim) ...
    for fqn, t in plan.embeddings.values():
        _center_(t, dim=1)
        report.recentered_embeddings.append(fqn)
    report.embeddings_recentered = len(plan.embeddings)
    # ... and every branch's output projection over its output features.
    for path, w, b, out_dim in plan.projections.values():
        _center_(w, dim=out_dim)
        if b is not None:
            _center_(b, dim=0)
        report.recentered_projections.append(path)
    report.projections_recentered = len(plan.projections)

    # 4. replace every LayerNorm (by object, wherever it is registered) with an RMSNorm.
    replacement: dict[int, nn.Module] = {}
    for key, (path, ln, _) in plan.norms.items():
        keep = key not in folded_ids
        replacement[key] = RMSNorm(
            ln.normalized_shape[0],
            ln.eps,
            weight=ln.weight if keep else None,
            bias=getattr(ln, "bias", None) if keep else None,
        )
        report.replaced_norms.append(path)
    unused = []
    for path, mod in list(model.named_modules(remove_duplicate=False)):
        if isinstance(mod, nn.LayerNorm) and id(mod) not in replacement:
            unused.append(path)
    if unused:
        report.notes.append(f"LayerNorm(s) never called in forward left as they are: {', '.join(sorted(set(unused)))}")
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                setattr(parent, name, replacement[id(child)])
    report.layer_norms_replaced = len(replacement)

    report.residual_branches = sum(
        1 for a in plan.residual_adds if any(_reaches_projection(g, x) for x in a.args)
    )
    blocks = set()
    root_adds = 0
    for a in plan.residual_adds:
        if not any(_reaches_projection(g, x) for x in a.args):
            continue
        where = g.where(a)
        if where == "<model>":
            root_adds += 1
        else:
            blocks.add(where)
    report.blocks_converted = len(blocks) + root_adds


def _reaches_projection(g: _Graph, n) -> bool:
    while isinstance(n, fx.Node):
        if g.projection(n) is not None:
            return True
        n = _passthrough_input(n)
    return False


# =============================================================================================
# Checking


def _bind(model: nn.Module, inputs: dict) -> tuple[tuple, dict]:
    """Positional args for the leading forward parameters that ``inputs`` names, kwargs for the rest."""
    names = _bound_names(model, inputs)
    args = tuple(inputs[k] for k in names[0])
    return args, {k: inputs[k] for k in names[1]}


def _bound_names(model: nn.Module, inputs: dict) -> tuple[list[str], list[str]]:
    try:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    positional = []
    for name in params:
        if name not in inputs:
            break
        positional.append(name)
    return positional, [k for k in inputs if k not in positional]


def _run(model: nn.Module, inputs: dict):
    args, kwargs = _bind(model, inputs)
    with torch.no_grad():
        return model(*args, **kwargs)


def _float_leaves(out) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]


def _index_highs(g: _Graph, example_inputs: dict) -> dict[str, int]:
    """For integer inputs that index embeddings: the smallest table size (draw below it)."""
    positional, keywords = _bound_names(g.model, example_inputs)
    user = [s.arg.name for s in g.ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in g.graph.nodes if n.op == "placeholder"}
    highs: dict[str, int] = {}
    for name, ph_name in zip(positional + keywords, user):
        todo, seen = [placeholders[ph_name]] if ph_name in placeholders else [], set()
        while todo:
            v = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            for u in v.users:
                if u.target is aten.embedding.default and u.args[1] is v and g.param(u.args[0]) is not None:
                    rows = int(g.param(u.args[0]).shape[0])
                    highs[name] = min(highs.get(name, rows), rows)
                elif u.target in _VIEWS or u.target in _DIM_OPS:
                    todo.append(u)
    return highs


def random_inputs(example_inputs: dict, highs: dict[str, int], seed: int) -> dict:
    """Fresh seeded inputs shaped like the example: ids below the table size, floats ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in example_inputs.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
        elif v.dtype.is_floating_point:
            out[k] = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype)
        elif k in highs and v.dtype != torch.bool:
            out[k] = torch.randint(0, highs[k], v.shape, generator=gen, dtype=v.dtype)
        else:
            out[k] = v.clone()  # masks and other integer inputs: keep the example's values
    return out


def compare(original: nn.Module, converted: nn.Module, draws: list[dict]) -> tuple[float, float]:
    """max |Δ| and max |Δ| / max |reference| over every float output and every draw."""
    max_abs = max_rel = 0.0
    for inputs in draws:
        ref = _float_leaves(_run(original, inputs))
        got = _float_leaves(_run(converted, inputs))
        if len(ref) != len(got) or not ref:
            raise NormexportError("the converted model's outputs do not match the original's in structure", "")
        for a, b in zip(ref, got):
            a64, b64 = a.detach().double(), b.detach().double()
            if a64.shape != b64.shape:
                raise NormexportError(f"output shape changed: {tuple(a.shape)} -> {tuple(b.shape)}", "")
            diff = (a64 - b64).abs().max().item() if a64.numel() else 0.0
            scale = a64.abs().max().item() if a64.numel() else 0.0
            if not math.isfinite(diff):
                return float("inf"), float("inf")
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / max(scale, 1e-30))
    return max_abs, max_rel


# =============================================================================================
# API


def check_trainable_state(module: nn.Module) -> None:
    if isinstance(module, torch.jit.ScriptModule):
        raise NormexportError(
            "a TorchScript module cannot be converted: ln2rms rewrites nn.Module weights and submodules",
            "give the nn.Module (a state_dict with --factory, or a trusted pickle)",
        )
    if module.training:
        raise NormexportError(
            "the model is in training mode (dropout would make it non-deterministic)",
            "call model.eval() (e.g. in the factory) before converting",
        )
    for path, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise NormexportError(
                f"dropout {path} (p={m.p}) is in training mode",
                "call model.eval() (e.g. in the factory) before converting",
            )


def ln2rms(
    module: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    fold_affine: bool = False,
    samples: int = 3,
    seed: int = 0,
    strict: bool = True,
) -> tuple[nn.Module, Ln2RmsReport]:
    """Convert a Pre-LN transformer into the equivalent Pre-RMSNorm one.

    The input module is not modified: a deep copy is converted and returned with a report.
    Equivalence is checked on ``samples`` seeded random draws shaped like ``example_inputs``
    (fp32 logits, ``max_rel <= REL_TOL``). With ``strict`` (the default), a failed check
    raises ``ValidationFailed`` carrying the report. Structural refusals raise
    ``NormexportError``.
    """
    if not isinstance(module, nn.Module):
        raise NormexportError(f"expected an nn.Module, got {type(module).__name__}", "")
    if not example_inputs:
        raise NormexportError("ln2rms needs example inputs to trace the model", "pass e.g. {'input_ids': ids}")
    check_trainable_state(module)
    converted = copy.deepcopy(module)
    g, plan = _analyse(converted, example_inputs, fold_affine)
    report = Ln2RmsReport(notes=list(plan.notes))
    highs = _index_highs(g, example_inputs)
    _apply(converted, g, plan, report)
    converted.eval()

    report.index_ranges = dict(highs)
    draws = [random_inputs(example_inputs, highs, seed + i) for i in range(max(1, samples))]
    report.samples = len(draws)
    dtypes = {p.dtype for p in module.parameters()}
    if dtypes - {torch.float32, torch.float64}:
        report.notes.append(
            f"parameters in {sorted(str(d) for d in dtypes)}: the check compares in that precision, "
            f"the {REL_TOL:g} tolerance assumes fp32"
        )
    report.max_abs, report.max_rel = compare(module, converted, draws)
    report.passed = math.isfinite(report.max_rel) and report.max_rel <= REL_TOL
    if not report.passed and strict:
        raise ValidationFailed(
            f"converted model differs from the original: max_rel {report.max_rel:.3g} > {REL_TOL:g}",
            report,
        )
    return converted, report


# =============================================================================================
# Export archive


def _export_inputs(example_inputs: dict) -> dict:
    """Example inputs with a batch of 2, so that torch.export keeps the batch dim dynamic."""
    out = {}
    for k, v in example_inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 1:
            v = torch.cat([v, v], dim=0)
        out[k] = v
    return out


def export_program(module: nn.Module, example_inputs: dict, dynamic: bool = True):
    """torch.export ``module`` with batch (dim 0) and sequence (dim 1) dynamic where it allows.

    Returns (ExportedProgram, list of dims that stayed dynamic as "name[dim]").
    """
    from torch.export import Dim

    module.eval()
    inputs = _export_inputs(example_inputs) if dynamic else dict(example_inputs)
    args, kwargs = _bind(module, inputs)
    ep = None
    if dynamic:
        names = [k for k in inputs if any(inputs[k] is a for a in args)] + list(kwargs)
        spec = {
            k: ({i: Dim.AUTO for i in range(min(2, inputs[k].dim()))} if isinstance(inputs[k], torch.Tensor) and inputs[k].dim() else None)
            for k in names
        }
        try:
            with torch.no_grad():
                ep = torch.export.export(module, args, kwargs, dynamic_shapes=spec, strict=False)
        except Exception:  # noqa: BLE001 - fall back to static shapes
            ep = None
    if ep is None:
        args, kwargs = _bind(module, dict(example_inputs))
        with torch.no_grad():
            ep = torch.export.export(module, args, kwargs, strict=False)
    dyn = []
    for ph in ep.graph.nodes:
        if ph.op == "placeholder" and ph.name in {
            s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"
        }:
            v = ph.meta.get("val")
            if isinstance(v, torch.Tensor):
                dyn += [f"{ph.name}[{i}]" for i, s in enumerate(v.shape) if not isinstance(s, int)]
    return ep, dyn


def export_archive(
    converted: nn.Module, example_inputs: dict, out: str | os.PathLike, check_inputs: list[dict] | None = None
) -> dict:
    """torch.export ``converted``, check the archive by loading it back, and write it to ``out``
    atomically (normexport.outputs). Returns facts for the report."""
    from normexport import outputs

    out = Path(out)
    ep, dynamic = export_program(converted, example_inputs)
    buf = io.BytesIO()  # serialised and checked in memory; only a checked archive is written
    torch.export.save(ep, buf)
    loaded = load_exported(buf.getvalue()).module()  # our own archive, loaded as safely as any
    worst = 0.0
    for inputs in check_inputs or [example_inputs]:
        ref = _float_leaves(_run(converted, inputs))
        args, kwargs = _bind(converted, inputs)
        with torch.no_grad():
            got = _float_leaves(loaded(*args, **kwargs))
        for a, b in zip(ref, got):
            worst = max(worst, (a.double() - b.double()).abs().max().item())
    if not worst <= 1e-5 * max(1.0, max(r.abs().max().item() for r in ref)):
        raise ValidationFailed(f"the exported archive does not reproduce the converted model (max abs {worst:.3g})")
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_bytes(out, buf.getvalue())
    return {"output": str(out), "dynamic_dims": dynamic, "archive_max_abs_vs_converted": worst}


# =============================================================================================
# CLI


def _load_for_cli(model_path: str, factory: str | None, trust_pickle: bool) -> tuple[nn.Module, dict]:
    from normexport import load as nload

    lm = nload.load_model(model_path, factory=factory, trust_pickle=trust_pickle)
    if lm.kind in ("torchscript", "export"):
        raise NormexportError(
            f"{model_path} is a {'TorchScript' if lm.kind == 'torchscript' else 'torch.export'} archive: "
            "it has no nn.LayerNorm modules to replace",
            "give the nn.Module: its state_dict with --factory MODULE:FUNCTION, or a trusted pickle",
        )
    module = lm.module
    example = None
    if lm.input_specs:
        example = nload.make_inputs(lm.input_specs, seed=0)
    if example is None:
        emb = next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
        names = lm.input_names or ["input_ids"]
        if emb is None or len(names) != 1:
            raise NormexportError(
                f"no example inputs are known for {model_path}",
                "use a factory that returns (module, {'input_ids': tensor})",
            )
        gen = torch.Generator().manual_seed(0)
        example = {names[0]: torch.randint(0, emb.num_embeddings, (1, 16), generator=gen)}
    return module, example


def _print_table(report: Ln2RmsReport, facts: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="ln2rms: Pre-LN -> Pre-RMSNorm", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("blocks converted", str(report.blocks_converted))
    t.add_row("residual branches recentred", str(report.residual_branches))
    t.add_row("LayerNorms -> RMSNorm", str(report.layer_norms_replaced))
    t.add_row("affines folded", str(report.folded))
    t.add_row("embeddings recentred", str(report.embeddings_recentered))
    t.add_row("head untied", "yes" if report.head_untied else "no")
    t.add_row("max abs / max rel", f"{report.max_abs:.3g} / {report.max_rel:.3g} ({report.samples} draws)")
    t.add_row("equivalent", "[green]yes[/green]" if report.passed else "[red]NO[/red]")
    if facts.get("output"):
        t.add_row("written", f"{facts['output']} (dynamic: {', '.join(facts['dynamic_dims']) or 'none'})")
    Console().print(t)
    for note in report.notes:
        Console().print(f"note: {note}")


def _write_json(path: str, payload: dict) -> None:
    from normexport.report import write_json

    write_json(payload, path)


def _make_command():
    import click

    @click.command("ln2rms")
    @click.argument("model", type=click.Path())  # normexport.load refuses anything but a regular file
    @click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Where to write the converted model (torch.export .pt2 archive).")
    @click.option("--factory", default=None, help="MODULE:FUNCTION that builds the module (for a state_dict MODEL).")
    @click.option("--fold-affine", is_flag=True, help="Fold each norm's gain and bias into the linear layers it feeds, where all its consumers are linear.")
    @click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False), help="Write the conversion report as JSON.")
    @click.option("--trust-pickle", is_flag=True, help="Allow unpickling a whole pickled module, or .pt2 members that need more than tensors (runs code from the file).")
    @click.option("--force", is_flag=True, help="Replace an existing file at -o / --report that normexport did not write. Never an input.")
    def ln2rms_command(model, output, factory, fold_affine, report_path, trust_pickle, force):
        """Convert a Pre-LN transformer into an equivalent Pre-RMSNorm one (Jiang et al. 2023)."""
        from normexport.outputs import Output, check

        try:
            factory_file = (factory or "").rpartition(":")[0]
            reads = [model, factory_file if factory_file.endswith(".py") else None]
            check(reads, [Output("-o", Path(output), "pt2"), Output("--report", report_path and Path(report_path), "report")], force)
            module, example = _load_for_cli(model, factory, trust_pickle)
            payload: dict = {"model": model, "output": output, "fold_affine": fold_affine}
            try:
                converted, report = ln2rms(module, example, fold_affine=fold_affine)
                draws = [random_inputs(example, report.index_ranges, 1000 + i) for i in range(2)]
                facts = export_archive(converted, example, output, check_inputs=[example] + draws)
            except ValidationFailed as e:  # nothing is written: exit 1 with the numbers
                if report_path and e.report is not None:
                    _write_json(report_path, {**payload, "output": None, **e.report.to_dict()})
                if e.report is not None:
                    _print_table(e.report, {})
                click.echo(f"error: {e}", err=True)
                sys.exit(ValidationFailed.exit_code)
            payload.update(report.to_dict())
            payload.update(facts)
            if report_path:
                _write_json(report_path, payload)
            _print_table(report, facts)
        except NormexportError as e:
            if click.get_current_context().parent is not None:
                raise  # under `normexport`: the top-level handler prints it (and honours --debug)
            click.echo(f"error: {e.message}", err=True)  # standalone: same two lines, exit 2
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            sys.exit(e.exit_code)

    return ln2rms_command


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


try:
    ln2rms_command = _make_command()
except ImportError:  # pragma: no cover - click is a dependency of the CLI only
    ln2rms_command = None
