"""Recognise a Pre-LN transformer on its torch.export graph and plan the rewrite.

Each step checks one claim of the conversion's maths on the dataflow and refuses with the
reason (NormexportError) where it does not hold: the residual stream is a sum of embedding
rows and linear-layer outputs, every read of it goes through a LayerNorm over the hidden dim,
and the recentred parameters are used nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from normexport.errors import NormexportError
from normexport.ln2rms.folds import plan_folds
from normexport.ln2rms.graph import (
    Plan,
    ADD,
    DIM_OPS,
    META_USERS,
    VIEWS,
    Projection,
    aten,
    TracedModel,
    describe,
    dropout_active,
    passthrough_input,
    rank_last,
)
from normexport.load import bound_names


@dataclass
class _Stream:
    """The residual stream traced back from the LayerNorms: its nodes and what starts it."""

    nodes: set = field(default_factory=set)
    embeddings: list = field(default_factory=list)  # embedding lookup nodes
    projections: list = field(default_factory=list)  # Projection of each branch's last layer
    residual_adds: list = field(default_factory=list)


def analyse(model: nn.Module, example_inputs: dict, fold_affine: bool) -> tuple[TracedModel, Plan]:
    """Trace ``model`` and plan its conversion; refuse (NormexportError) what is not Pre-LN."""
    g = TracedModel(model, example_inputs)
    nodes = list(g.graph.nodes)
    _refuse_active_dropout(g, nodes)
    norms = _layer_norm_nodes(g, nodes)
    stream = _trace_stream(g, norms)
    order = {n: i for i, n in enumerate(nodes)}
    stream.embeddings.sort(key=order.__getitem__)
    stream.projections.sort(key=lambda p: order[p.node])
    _check_stream_reads(g, stream, order)
    plan = Plan(stream=stream.nodes, residual_adds=stream.residual_adds)
    plan.norms = _norm_modules(g, norms)
    plan.embeddings = _embedding_tables(g, stream.embeddings)
    plan.projections = _output_projections(g, stream.projections)
    emb_tensors, proj_tensors = _recentred_tensors(plan)
    plan.untie = _ties_to_untie(g, stream.embeddings, emb_tensors)
    _check_other_uses(g, plan, emb_tensors, proj_tensors)
    if fold_affine:
        plan_folds(g, plan)
    return g, plan


def _refuse_active_dropout(g: TracedModel, nodes: list[fx.Node]) -> None:
    for n in nodes:
        if n.op == "call_function" and dropout_active(n):
            raise NormexportError(
                f"dropout in training mode ({describe(g, n)}): the model is not deterministic",
                "put the model in eval mode (model.eval()) before converting",
            )


def _layer_norm_nodes(g: TracedModel, nodes: list[fx.Node]) -> list[fx.Node]:
    norms = [n for n in nodes if g.is_norm(n)]
    if not norms:
        raise NormexportError(
            "no LayerNorm found in the traced model: nothing to convert",
            "ln2rms converts Pre-LN transformers (nn.LayerNorm before each branch)",
        )
    return norms


def _trace_stream(g: TracedModel, norms: list[fx.Node]) -> _Stream:
    """Everything a LayerNorm reads, traced backwards through adds and row-wise views down to
    the embedding lookups and linear layers that start it."""
    stream = _Stream()
    todo: list[tuple[fx.Node, fx.Node | None, fx.Node]] = [(ln.args[0], None, ln) for ln in norms]
    while todo:
        n, via_add, reader = todo.pop()
        if n in stream.nodes:
            continue
        if not isinstance(n, fx.Node):
            raise NormexportError(
                f"a constant is added into the residual stream at {describe(g, via_add or reader)}",
                "only embeddings and branch outputs may enter the stream (a constant breaks its zero mean)",
            )
        stream.nodes.add(n)
        proj = g.projection(n)
        src = passthrough_input(n)
        if g.embedding(n) is not None:
            stream.embeddings.append(n)
        elif proj is not None:
            stream.projections.append(proj)
        elif src is not None:
            todo.append((src, via_add, reader))
        elif n.op == "call_function" and n.target in ADD and n.kwargs.get("alpha", 1) == 1 and len(n.args) == 2:
            stream.residual_adds.append(n)
            todo.extend((a, n, reader) for a in n.args)
        else:
            _refuse_stream_source(g, n, via_add, reader)
    return stream


def _refuse_stream_source(g: TracedModel, n: fx.Node, via_add: fx.Node | None, reader: fx.Node) -> None:
    """``n`` feeds the stream ``reader`` reads but is no embedding, branch output or add: why."""
    ln_in = g.norm_output_of(n)
    if ln_in is not None:
        raise NormexportError(
            f"Post-LN: the residual stream read by {describe(g, reader)} is the output of "
            f"{describe(g, ln_in)} (the norm comes after the residual add)",
            "ln2rms converts Pre-LN transformers only (x = x + f(LN(x))); a Post-LN model "
            "cannot be made to compute the same function with RMSNorm",
        )
    if via_add is None:
        raise NormexportError(
            f"{describe(g, reader)} reads {describe(g, n)}, not the residual stream",
            "ln2rms converts norms that read the residual stream (Pre-LN) only",
        )
    raise NormexportError(
        f"the branch added into the residual stream at {describe(g, via_add)} ends in "
        f"{describe(g, n)}, not in a linear layer",
        "every residual branch must end in its output projection (nn.Linear / HF Conv1D) "
        "so that the projection can be recentred",
    )


def _check_stream_reads(g: TracedModel, stream: _Stream, order: dict) -> None:
    """Every read of the stream goes through a LayerNorm."""
    leaves = set(stream.embeddings) | {p.node for p in stream.projections}  # start the stream, do not read it
    for n in sorted(stream.nodes, key=order.__getitem__):
        for u in n.users:
            if (u in stream.nodes and u not in leaves) or u.target in META_USERS:
                continue
            if g.is_norm(u) and u.args[0] is n:
                continue
            proj = g.projection(u)
            if proj is not None and n in (proj.weight, proj.bias):
                continue
            if u.op == "output":
                raise NormexportError(
                    f"the residual stream ({describe(g, n)}) is a model output, without a LayerNorm",
                    "return only what is computed after the final LayerNorm (e.g. the logits)",
                )
            raise NormexportError(
                f"the residual stream is read without a LayerNorm by {describe(g, u)}",
                "in a Pre-LN transformer every branch reads the stream through a LayerNorm; "
                "removing the stream's mean would change what this op computes",
            )


def _norm_modules(g: TracedModel, norms: list[fx.Node]) -> dict:
    """id(LayerNorm module) -> (path, module, its layer_norm nodes); each over the hidden dim."""
    out: dict = {}
    for ln in norms:
        path, mod = g.owner(ln, nn.LayerNorm)
        if mod is None:
            raise NormexportError(
                f"a functional layer_norm in {g.where(ln)} is not an nn.LayerNorm module",
                "ln2rms replaces nn.LayerNorm modules; TorchScript and torch.export archives have none, "
                "so give the nn.Module (state_dict + --factory, or a trusted pickle)",
            )
        shape = list(ln.args[1])
        _, last = rank_last(ln.args[0])
        if len(shape) != 1 or shape[0] != last:
            raise NormexportError(
                f"LayerNorm {path} normalises {shape}, not the last (hidden) dim",
                "ln2rms converts LayerNorms over the hidden dim only",
            )
        out.setdefault(id(mod), (path, mod, []))[2].append(ln)
    return out


def _embedding_tables(g: TracedModel, emb_nodes: list[fx.Node]) -> dict:
    """id(table) -> (name, table) for every embedding lookup that starts the stream."""
    out: dict = {}
    for n in emb_nodes:
        t = g.embedding(n)
        owner = g.owner_of_param(n, t)
        if owner is not None and isinstance(owner[1], nn.Embedding) and owner[1].max_norm is not None:
            raise NormexportError(
                f"embedding {owner[0]} uses max_norm: recentring its rows would change the renormalisation",
                "drop max_norm (it only matters in training)",
            )
        name = f"{owner[0]}.{owner[2]}" if owner is not None else g.fqn(n.args[0])
        out.setdefault(id(t), (name, t))
    return out


def _output_projections(g: TracedModel, projections: list[Projection]) -> dict:
    """id(weight) -> (path, weight, bias, out_dim) for every branch's output projection."""
    out: dict = {}
    for p in projections:
        w = g.param(p.weight)
        b = g.param(p.bias) if p.bias is not None else None
        prev = out.get(id(w))
        if prev is not None and (prev[3] != p.out_dim or prev[2] is not b):
            raise NormexportError(
                f"weight {g.fqn(p.weight)} is used as two different projections",
                "ln2rms needs each output projection to be one linear layer",
            )
        owner = g.owner_of_param(p.node, w)
        path = owner[0] if owner else g.fqn(p.weight).rsplit(".", 1)[0]
        out[id(w)] = (path, w, b, p.out_dim)
    return out


def _recentred_tensors(plan: Plan) -> tuple[dict, dict]:
    """The tensors the rewrite recentres, by id: embedding tables, projection weights and biases."""
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
    return emb_tensors, proj_tensors


def _ties_to_untie(g: TracedModel, emb_nodes: list[fx.Node], emb_tensors: dict) -> list:
    """Other modules holding an embedding table as their own parameter (e.g. a tied
    ``lm_head.weight``): (path, module, attr, table) for each, to be given the original table."""
    embedding_owners = set()
    for n in emb_nodes:
        o = g.owner_of_param(n, g.embedding(n))
        if o is not None:
            embedding_owners.add(id(o[1]))
    untie: list = []
    for t in emb_tensors.values():
        for path, mod in g.model.named_modules(remove_duplicate=False):
            if id(mod) in embedding_owners:
                continue
            for attr, p in mod._parameters.items():
                if p is t and not any(u[1] is mod and u[2] == attr for u in untie):
                    untie.append((path, mod, attr, t))
    return untie


def _check_other_uses(g: TracedModel, plan: Plan, emb_tensors: dict, proj_tensors: dict) -> None:
    """A recentred tensor is used only in its role in the stream (or by a module being untied)."""
    untied_owners = {(id(u[1]), u[2]) for u in plan.untie}
    for key, t in {**emb_tensors, **proj_tensors}.items():
        for ph in g.placeholders_of(t):
            for u in ph.users:
                if u in plan.stream and _uses_in_role(g, u, ph, t):
                    continue
                o = g.owner_of_param(u, t)
                if key in emb_tensors and o is not None and (id(o[1]), o[2]) in untied_owners:
                    continue  # a tied head: it will get its own copy of the original table
                what = "embedding table" if key in emb_tensors else "output projection parameter"
                raise NormexportError(
                    f"{what} {g.fqn(ph)} is also used by {describe(g, u)}, which would see the recentred values",
                    "ln2rms can untie a module that shares the table (like a tied LM head), "
                    "not a functional use of it; use the parameter through its own module",
                )


def _uses_in_role(g: TracedModel, u: fx.Node, ph: fx.Node, t) -> bool:
    """``u`` is the embedding lookup of table ``t`` or the projection whose parameter ``ph`` is."""
    if g.embedding(u) is t and u.args[0] is ph:
        return True
    proj = g.projection(u)
    return proj is not None and ph in (proj.weight, proj.bias)


def index_highs(g: TracedModel, example_inputs: dict) -> dict[str, int]:
    """For integer inputs that index embeddings: the smallest table size (draw below it)."""
    names = [n for group in bound_names(g.model, example_inputs) for n in group]
    user = [s.arg.name for s in g.ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in g.graph.nodes if n.op == "placeholder"}
    highs: dict[str, int] = {}
    for name, ph_name in zip(names, user):
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
                elif u.target in VIEWS or u.target in DIM_OPS:
                    todo.append(u)
    return highs
