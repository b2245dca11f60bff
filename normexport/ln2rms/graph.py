"""The torch.export graph ln2rms reads: the aten ops it knows, and the maps from graph
nodes back to the model's modules and parameters."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from normexport.errors import NormexportError, first_line
from normexport.load import export_program

aten = torch.ops.aten

# Graph vocabulary (aten ops of a torch.export graph)

LAYER_NORM = {aten.layer_norm.default, aten.native_layer_norm.default}
ADD = {aten.add.Tensor}
META_USERS = {
    aten.sym_size.int,
    aten.sym_stride.int,
    aten.sym_numel.default,
    aten.sym_storage_offset.default,
    aten._assert_tensor_metadata.default,
}
# Ops that act on every hidden-dim row the same linear way, keeping the last dim whole:
# they commute with centring, so a centred stream stays centred through them.
VIEWS = {
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
DIM_OPS = {aten.slice.Tensor, aten.select.int}  # (x, dim, ...): fine unless dim is the last
PERMUTES = {aten.transpose.int, aten.permute.default}
SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
DROPOUT = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def rank_last(n) -> tuple[int | None, Any]:
    v = _val(n)
    if isinstance(v, torch.Tensor):
        return v.dim(), v.shape[-1] if v.dim() else None
    return None, None


def _is_number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def dropout_active(n: fx.Node) -> bool:
    if n.target not in DROPOUT:
        return False
    p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
    train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)
    return bool(train) and bool(p)


def passthrough_input(n: fx.Node) -> fx.Node | None:
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
    rank_in, last_in = rank_last(x)
    rank_out, last_out = rank_last(n)
    if rank_in is None or rank_out is None or rank_in == 0 or rank_out == 0:
        return None
    if n.target in DROPOUT:
        if dropout_active(n):
            return None
        return x if n.target is not aten.native_dropout.default else None
    same_last = last_in == last_out
    if n.target in VIEWS:
        if n.target in (aten.unsqueeze.default,):
            d = n.args[1] % (rank_in + 1)
            return x if d != rank_in and same_last else None
        if n.target in (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default):
            ok = isinstance(_val(n), torch.Tensor) and _val(n).dtype.is_floating_point
            return x if ok and same_last else None
        return x if same_last else None
    if n.target in DIM_OPS:
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        return x if d % rank_in != rank_in - 1 and same_last else None
    if n.target in PERMUTES:
        if n.target is aten.transpose.int:
            dims = [n.args[1] % rank_in, n.args[2] % rank_in]
            return x if rank_in - 1 not in dims else None
        perm = [p % rank_in for p in n.args[1]]
        return x if perm[-1] == rank_in - 1 else None
    if n.target in SCALE_OPS and len(n_args) == 2 and _is_number(n_args[1]):
        return x
    return None



@dataclass
class Projection:
    node: fx.Node
    x: fx.Node
    weight: fx.Node  # placeholder
    bias: fx.Node | None  # placeholder
    out_dim: int  # the weight dim that indexes output features: 0 for linear, 1 for addmm


class TracedModel:
    """A torch.export graph of the model plus the maps back to its modules and parameters."""

    def __init__(self, model: nn.Module, example_inputs: dict):
        self.model = model
        try:
            with torch.no_grad():
                ep = export_program(model, example_inputs, dynamic=False)
        except Exception as e:  # noqa: BLE001 - any tracing failure becomes a refusal
            raise NormexportError(
                f"cannot trace the model with torch.export ({type(e).__name__}: {first_line(e)})",
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

    def projection(self, n: fx.Node) -> Projection | None:
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
        return Projection(n, x, w, b, out_dim)

    def embedding(self, n: fx.Node) -> torch.Tensor | None:
        if n.op == "call_function" and n.target is aten.embedding.default:
            return self.param(n.args[0])
        return None

    def is_norm(self, n: fx.Node) -> bool:
        return n.op == "call_function" and n.target in LAYER_NORM

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


def describe(g: TracedModel, n: fx.Node) -> str:
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


@dataclass
class Plan:
    """What ``analysis`` found and ``rewrite`` changes: the stream, its sources, the norms, the folds."""

    stream: set = field(default_factory=set)
    embeddings: dict = field(default_factory=dict)  # id(tensor) -> (fqn, tensor)
    projections: dict = field(default_factory=dict)  # id(weight) -> (path, weight, bias, out_dim)
    residual_adds: list = field(default_factory=list)
    norms: dict = field(default_factory=dict)  # id(LayerNorm) -> (path, module, [ln nodes])
    untie: list = field(default_factory=list)  # (owner path, owner module, attr, tensor)
    folds: dict = field(default_factory=dict)  # id(LayerNorm) -> [(path, module, out_dim)]
    notes: list = field(default_factory=list)
