"""The converted model as a self-contained torch.export archive, checked before it is written."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from normexport import outputs
from normexport.errors import ValidationFailed
from normexport.ln2rms.equivalence import float_leaves, float_outputs
from normexport.load import bind_inputs, export_program, exported_bytes
from normexport.pt2 import load_exported


def export_archive(
    converted: nn.Module, example_inputs: dict, out: str | os.PathLike, check_inputs: list[dict] | None = None
) -> dict:
    """torch.export ``converted`` (batch and sequence dynamic where torch allows), check the
    archive by loading it back, and write it to ``out`` atomically (normexport.outputs).
    Returns facts for the report."""
    out = Path(out)
    with torch.no_grad():
        ep = export_program(converted, example_inputs)
    dynamic = dynamic_input_dims(ep)
    data = exported_bytes(ep)  # serialised and checked in memory; only a checked archive is written
    loaded = load_exported(data).module()  # our own archive, loaded as safely as any
    worst = scale = 0.0
    for inputs in check_inputs or [example_inputs]:
        ref = float_outputs(converted, inputs)
        args, kwargs = bind_inputs(converted, inputs)
        with torch.no_grad():
            got = float_leaves(loaded(*args, **kwargs))
        for a, b in zip(ref, got):
            worst = max(worst, (a.double() - b.double()).abs().max().item())
        scale = max(r.abs().max().item() for r in ref)
    if not worst <= 1e-5 * max(1.0, scale):
        raise ValidationFailed(f"the exported archive does not reproduce the converted model (max abs {worst:.3g})")
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_bytes(out, data)
    return {"output": str(out), "dynamic_dims": dynamic, "archive_max_abs_vs_converted": worst}


def dynamic_input_dims(ep) -> list[str]:
    """The user-input dims that stayed dynamic in ``ep``, as "name[dim]"."""
    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    dims = []
    for ph in ep.graph.nodes:
        v = ph.meta.get("val") if ph.op == "placeholder" and ph.name in user else None
        if isinstance(v, torch.Tensor):
            dims += [f"{ph.name}[{i}]" for i, s in enumerate(v.shape) if not isinstance(s, int)]
    return dims
