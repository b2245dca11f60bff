"""The seeded equivalence check: the converted model against the original on fresh inputs."""

from __future__ import annotations

import math

import torch
from torch import nn

from normexport.errors import NormexportError
from normexport.load import bind_inputs
from normexport.runners.torch_runner import flatten_outputs

REL_TOL = 1e-4  # max |Δlogits| / max |logits|, fp32


def random_inputs(example_inputs: dict, highs: dict[str, int], seed: int) -> dict:
    """Fresh seeded inputs shaped like the example: ids below the table size, floats ~ N(0, 1),
    masks and other integer inputs kept as the example has them (a random mask can hide a
    whole row)."""
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
            out[k] = v.clone()
    return out


def float_outputs(model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    """Run ``model`` on ``inputs`` (bound to its forward's parameters); its floating-point outputs."""
    args, kwargs = bind_inputs(model, inputs)
    with torch.no_grad():
        return float_leaves(model(*args, **kwargs))


def float_leaves(out) -> list[torch.Tensor]:
    return [t for t in flatten_outputs(out) if t.dtype.is_floating_point]


def max_deviation(original: nn.Module, converted: nn.Module, draws: list[dict]) -> tuple[float, float]:
    """max |Δ| and max |Δ| / max |reference| over every float output and every draw.

    The relative figure is scaled by the output's largest magnitude, not element by element
    (normexport.validate's rtol): a logit near zero is not expected to keep its relative digits.
    """
    max_abs = max_rel = 0.0
    for inputs in draws:
        ref = float_outputs(original, inputs)
        got = float_outputs(converted, inputs)
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


def check_equivalence(original: nn.Module, converted: nn.Module, example_inputs: dict, highs: dict, samples: int, seed: int, report) -> None:
    """Compare on ``samples`` seeded draws; fill the report's numbers and verdict."""
    draws = [random_inputs(example_inputs, highs, seed + i) for i in range(max(1, samples))]
    report.index_ranges = dict(highs)
    report.samples = len(draws)
    dtypes = {p.dtype for p in original.parameters()}
    if dtypes - {torch.float32, torch.float64}:
        report.notes.append(
            f"parameters in {sorted(str(d) for d in dtypes)}: the check compares in that precision, "
            f"the {REL_TOL:g} tolerance assumes fp32"
        )
    report.max_abs, report.max_rel = max_deviation(original, converted, draws)
    report.passed = math.isfinite(report.max_rel) and report.max_rel <= REL_TOL
