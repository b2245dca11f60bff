"""``ln2rms(module, example_inputs)``: the conversion, its refusals and its equivalence check."""

from __future__ import annotations

import copy

import torch
from torch import nn

from normexport.errors import NormexportError, ValidationFailed
from normexport.ln2rms.analysis import analyse, index_highs
from normexport.ln2rms.equivalence import REL_TOL, check_equivalence
from normexport.ln2rms.rewrite import Ln2RmsReport, apply


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
    g, plan = analyse(converted, example_inputs, fold_affine)
    report = Ln2RmsReport(notes=list(plan.notes))
    highs = index_highs(g, example_inputs)
    apply(converted, g, plan, report)
    converted.eval()
    check_equivalence(module, converted, example_inputs, highs, samples, seed, report)
    if not report.passed and strict:
        raise ValidationFailed(
            f"converted model differs from the original: max_rel {report.max_rel:.3g} > {REL_TOL:g}",
            report,
        )
    return converted, report
