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
the model), ``equivalence`` (the seeded check), ``archive`` (the checked .pt2), ``convert`` (``ln2rms``
itself), ``cli``. The names below are imported on first use: the CLI reads the command
without importing torch.
"""

from __future__ import annotations

from normexport.lazy import lazy_names

_WHERE = {
    "ln2rms": "convert", "check_trainable_state": "convert", "REL_TOL": "equivalence",
    "RMSNorm": "rewrite", "Ln2RmsReport": "rewrite", "export_archive": "archive", "ln2rms_command": "cli",
}

__all__ = ["RMSNorm", "Ln2RmsReport", "ln2rms", "export_archive", "ln2rms_command", "REL_TOL"]


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
