"""The rewrite: untie the head, fold affines, recentre the stream's sources, and replace
every LayerNorm with an RMSNorm (the maths is in the package docstring)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from normexport.ln2rms.graph import Plan
from normexport.ln2rms.equivalence import REL_TOL
from normexport.ln2rms.graph import TracedModel, passthrough_input


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


def apply(model: nn.Module, g: TracedModel, plan: Plan, report: Ln2RmsReport) -> None:
    """Rewrite ``model`` (the copy ``plan`` was made on) in place; record what was done."""
    _untie(plan, report)  # first: the head keeps a copy of the ORIGINAL table
    folded = _fold_affines(plan, report)
    _recentre(plan, report)
    _replace_norms(model, plan, folded, report)
    _count_branches(g, plan, report)


def _untie(plan: Plan, report: Ln2RmsReport) -> None:
    for path, mod, attr, t in plan.untie:
        setattr(mod, attr, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
        report.untied.append(f"{path}.{attr}" if path else attr)
    report.head_untied = bool(plan.untie)


def _fold_affines(plan: Plan, report: Ln2RmsReport) -> set:
    """Fold γ, β into the consumers: ``W (γ ⊙ x̂ + β) + b = (W diag γ) x̂ + (b + W β)``.
    Returns the ids of the norms folded."""
    folded = set()
    for key, targets in plan.folds.items():
        path, ln, _ = plan.norms[key]
        gamma = ln.weight.detach().to(torch.float64) if ln.weight is not None else None
        beta = ln.bias.detach().to(torch.float64) if getattr(ln, "bias", None) is not None else None
        for _, lin, out_dim in targets:
            _fold_into(lin, out_dim, gamma, beta)
        folded.add(key)
        report.folded_norms.append(path)
    report.folded = len(folded)
    return folded


def _fold_into(lin: nn.Module, out_dim: int, gamma: torch.Tensor | None, beta: torch.Tensor | None) -> None:
    with torch.no_grad():
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


def _center_(t: torch.Tensor, dim: int) -> None:
    with torch.no_grad():
        t64 = t.detach().to(torch.float64)
        t.copy_((t64 - t64.mean(dim=dim, keepdim=True)).to(t.dtype))


def _recentre(plan: Plan, report: Ln2RmsReport) -> None:
    """Embedding rows over the hidden dim; each branch's output projection over its output features."""
    for fqn, t in plan.embeddings.values():
        _center_(t, dim=1)
        report.recentered_embeddings.append(fqn)
    report.embeddings_recentered = len(plan.embeddings)
    for path, w, b, out_dim in plan.projections.values():
        _center_(w, dim=out_dim)
        if b is not None:
            _center_(b, dim=0)
        report.recentered_projections.append(path)
    report.projections_recentered = len(plan.projections)


def _replace_norms(model: nn.Module, plan: Plan, folded: set, report: Ln2RmsReport) -> None:
    """Every LayerNorm the model calls becomes an RMSNorm, by object, wherever it is registered."""
    replacement: dict[int, nn.Module] = {}
    for key, (path, ln, _) in plan.norms.items():
        keep = key not in folded
        replacement[key] = RMSNorm(
            ln.normalized_shape[0],
            ln.eps,
            weight=ln.weight if keep else None,
            bias=getattr(ln, "bias", None) if keep else None,
        )
        report.replaced_norms.append(path)
    unused = [
        path
        for path, mod in model.named_modules(remove_duplicate=False)
        if isinstance(mod, nn.LayerNorm) and id(mod) not in replacement
    ]
    if unused:
        report.notes.append(f"LayerNorm(s) never called in forward left as they are: {', '.join(sorted(set(unused)))}")
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                setattr(parent, name, replacement[id(child)])
    report.layer_norms_replaced = len(replacement)


def _count_branches(g: TracedModel, plan: Plan, report: Ln2RmsReport) -> None:
    """Residual branches (adds fed by a projection) and the blocks they sit in."""
    branch_adds = [a for a in plan.residual_adds if any(_reaches_projection(g, x) for x in a.args)]
    report.residual_branches = len(branch_adds)
    where = [g.where(a) for a in branch_adds]
    report.blocks_converted = len({w for w in where if w != "<model>"}) + where.count("<model>")


def _reaches_projection(g: TracedModel, n) -> bool:
    while isinstance(n, fx.Node):
        if g.projection(n) is not None:
            return True
        n = passthrough_input(n)
    return False
