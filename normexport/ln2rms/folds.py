"""Which LayerNorm affines can fold into the linear layers they feed (``--fold-affine``).

``W (γ ⊙ x̂ + β) + b = (W diag γ) x̂ + (b + W β)`` holds only where every consumer of the
norm's output is a linear layer that reads nothing else and owns its weight: anything else
keeps the affine on the RMSNorm, with the reason in the report's notes.
"""

from __future__ import annotations

from torch import fx

from normexport.ln2rms.graph import META_USERS, SCALE_OPS, Plan, Projection, TracedModel, aten, describe, passthrough_input


def plan_folds(g: TracedModel, plan: Plan) -> None:
    """Fill ``plan.folds`` (id(LayerNorm) -> [(path, linear module, out_dim)]) and note why
    each affine norm left out is kept."""
    consumers_of: dict[int, list[Projection]] = {}
    fed_by: dict[int, set] = {}  # id(weight) -> ids of LayerNorms feeding it
    blocked: dict[int, str] = {}
    for key, (_, mod, lns) in plan.norms.items():
        if mod.weight is None and mod.bias is None:
            continue
        found, reason = _norm_consumers(g, lns)
        if reason is not None:
            blocked[key] = reason
        consumers_of[key] = found
        for proj in found:
            fed_by.setdefault(id(g.param(proj.weight)), set()).add(key)
    untied = {id(u[1]) for u in plan.untie}
    for key, found in consumers_of.items():
        if key in blocked:
            continue
        mine = {p.node for p in found}
        for proj in found:
            reason = _fold_blocker(g, proj, key, mine, fed_by, untied)
            if reason is not None:
                blocked[key] = reason
                break
    for key, (path, mod, _) in plan.norms.items():
        if mod.weight is None and mod.bias is None:
            continue
        if key in blocked:
            plan.notes.append(f"{path}: affine kept on the RMSNorm, not folded ({blocked[key]})")
            continue
        targets = _fold_targets(g, consumers_of[key])
        if targets:
            plan.folds[key] = targets


def _norm_consumers(g: TracedModel, lns: list[fx.Node]) -> tuple[list[Projection], str | None]:
    """The linear layers a norm's output feeds (through row-wise views), and why the norm
    cannot fold where its output also goes elsewhere."""
    found: list[Projection] = []
    reason = None
    for ln in lns:
        todo = list(g.norm_outputs(ln))
        if ln.target is aten.native_layer_norm.default and len(todo) != 1:
            reason = "its output is used in an unusual way"
        while todo:
            v = todo.pop()
            for u in v.users:
                if u.target in META_USERS:
                    continue
                proj = g.projection(u)
                if proj is not None and proj.x is v and v not in (proj.weight, proj.bias):
                    found.append(proj)
                elif passthrough_input(u) is v and u.target not in SCALE_OPS:
                    todo.append(u)
                elif reason is None:
                    reason = f"its output also feeds {describe(g, u)}"
    return found, reason


def _fold_blocker(g: TracedModel, proj: Projection, key: int, mine: set, fed_by: dict, untied: set) -> str | None:
    """Why the norm ``key`` cannot fold into ``proj``: it must be a module's own weight and
    bias slot, every call of that module must read this norm only, and the weight unshared."""
    w = g.param(proj.weight)
    owner = g.owner_of_param(proj.node, w)
    if owner is None or owner[2] != "weight":
        return f"weight {g.fqn(proj.weight)} is used functionally, not as a module's weight"
    calls = [u for ph in g.placeholders_of(w) for u in ph.users if (o := g.owner_of_param(u, w)) is not None and o[1] is owner[1]]
    if fed_by.get(id(w)) != {key} or any(u not in mine for u in calls):
        return f"linear layer {owner[0]} also reads other inputs"
    sharers = {id(m) for _, m in g.model.named_modules(remove_duplicate=False) for q in m._parameters.values() if q is w}
    if sharers - {id(owner[1])} and id(owner[1]) not in untied:
        return f"the weight of {owner[0]} is shared with another module"
    bias_slot = owner[1]._parameters.get("bias", "absent")
    if isinstance(bias_slot, str):
        return f"linear layer {owner[0]} has no bias slot to take the folded shift"
    if proj.bias is not None and bias_slot is not g.param(proj.bias):
        return f"bias {g.fqn(proj.bias)} is not {owner[0]}.bias"
    return None


def _fold_targets(g: TracedModel, consumers: list[Projection]) -> list:
    """(path, module, out_dim) of each distinct linear module among ``consumers``."""
    targets, seen = [], set()
    for proj in consumers:
        owner = g.owner_of_param(proj.node, g.param(proj.weight))
        if id(owner[1]) not in seen:
            seen.add(id(owner[1]))
            targets.append((owner[0], owner[1], proj.out_dim))
    return targets
