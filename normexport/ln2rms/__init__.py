"""``normexport ln2rms``: turn a trained Pre-LN transformer into a Pre-RMSNorm one.

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

Modules: ``graph`` (the traced graph and the aten ops it knows), ``analysis`` (recognising the
Pre-LN structure) and ``folds`` (where ``--fold-affine`` applies), ``rewrite`` (the changes to
the model), ``equivalence`` (the seeded check), ``archive`` (the checked .pt2), ``cli``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from normexport.errors import NormexportError, ValidationFailed
from normexport.ln2rms.analysis import analyse, index_highs
from normexport.ln2rms.archive import export_archive
from normexport.ln2rms.equivalence import REL_TOL, check_equivalence
from normexport.ln2rms.rewrite import Ln2RmsReport, RMSNorm, apply

__all__ = ["RMSNorm", "Ln2RmsReport", "ln2rms", "export_archive", "ln2rms_command", "REL_TOL"]


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


from normexport.ln2rms.cli import ln2rms_command  # noqa: E402 (the command calls ln2rms above)
