"""Compare ONNX runs against PyTorch on the same seeded inputs, output by output.

A run passes where every element satisfies |got - ref| <= atol + rtol·|ref| (numpy's
allclose). It fails wherever either side has a NaN or Inf (NaN on both sides is no agreement:
it hides what each side computes), where an output has no elements, where the shapes differ
and where the output counts differ; each failure says where (output, index, side). Each comparison also says the smallest atol (at the given rtol) and the smallest
rtol (at the given atol) that would pass, so a user sees how far from the line a run is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from normexport.inputs import ANSI
from normexport.runners import DEFAULT_BACKEND

# Defaults by the output's dtype: float32 after a chain of fused / reordered reductions,
# float16 and bfloat16 at a few units of their last place on O(1) values.
DEFAULT_TOLERANCES = {
    "float64": (1e-7, 1e-6),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 2e-2),
}


def default_tolerance(dtype: np.dtype) -> tuple[float, float]:
    return DEFAULT_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))


@dataclass
class OutputComparison:
    name: str
    dtype: str
    shape: list[int]
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    atol: float
    rtol: float
    min_atol: float  # smallest atol that passes at this rtol
    min_rtol: float  # smallest rtol that passes at this atol
    nonfinite_mismatch: int  # NaN/Inf elements, on either side
    passed: bool
    sample: int = 0
    worst_index: list[int] = field(default_factory=list)
    problem: str = ""  # why it fails beyond the tolerances: NaN/Inf where, empty, shapes, counts

    def to_json(self) -> dict:
        return {k: (_json_float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _json_float(v: float):
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def tolerance_for(tol, name: str, default: float) -> float:
    """``tol``: one value, or per-output values by name with an optional default under None."""
    if isinstance(tol, dict):
        tol = tol.get(name, tol.get(None))
    return default if tol is None else float(tol)


def _failed(name, dt, shape, atol, rtol, sample, problem, index=()) -> OutputComparison:
    inf = float("inf")
    return OutputComparison(name, dt, list(shape), inf, inf, inf, float("nan"), atol, rtol, inf, inf, 0, False, sample, [int(i) for i in index], problem)


def _first_nonfinite(arr: np.ndarray) -> tuple[int, list[int], str]:
    bad = ~np.isfinite(arr)
    n = int(bad.sum())
    if not n:
        return 0, [], ""
    idx = [int(i) for i in np.unravel_index(int(np.argmax(bad)), arr.shape)]
    v = arr[tuple(idx)]
    return n, idx, "NaN" if np.isnan(v) else ("+Inf" if v > 0 else "-Inf")


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, atol=None, rtol=None, sample: int = 0, sides: tuple[str, str] = ("PyTorch", "ONNX")) -> OutputComparison:
    dt = np.dtype(ref.dtype)
    d_atol, d_rtol = default_tolerance(dt)
    atol = tolerance_for(atol, name, d_atol)
    rtol = tolerance_for(rtol, name, d_rtol)
    if ref.shape != got.shape:
        return _failed(name, dt.name, ref.shape, atol, rtol, sample, f"shape {list(ref.shape)} on the {sides[0]} side, {list(got.shape)} on the {sides[1]} side")
    if ref.size == 0:
        return _failed(name, dt.name, ref.shape, atol, rtol, sample, "no elements to compare")
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    n_r, idx_r, kind_r = _first_nonfinite(r)
    n_g, idx_g, kind_g = _first_nonfinite(g)
    if n_r or n_g:
        side, n, idx, kind = (sides[0], n_r, idx_r, kind_r) if n_r else (sides[1], n_g, idx_g, kind_g)
        c = _failed(name, dt.name, ref.shape, atol, rtol, sample, f"{kind} on the {side} side at index {idx} ({n} non-finite element(s) there)", idx)
        c.nonfinite_mismatch = n_r + n_g
        return c
    diff = np.abs(g - r)
    mag = np.abs(r)
    max_abs = float(diff.max())
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        rel = diff / np.maximum(mag, np.finfo(np.float64).tiny)
    rel = np.where(diff == 0, 0.0, rel)
    rf, gf = r.ravel(), g.ravel()
    denom = np.linalg.norm(rf) * np.linalg.norm(gf)
    cosine = float(rf @ gf / denom) if denom > 0 else (1.0 if np.array_equal(rf, gf) else 0.0)
    min_atol = float(np.max(diff - rtol * mag))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        need = np.where(diff > atol, (diff - atol) / np.maximum(mag, np.finfo(np.float64).tiny), 0.0)
    worst = [int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)]
    passed = bool(np.all(diff <= atol + rtol * mag))
    return OutputComparison(
        name, dt.name, list(ref.shape), max_abs, float(rel.max()), float(diff.mean()), cosine, atol, rtol, max(min_atol, 0.0), max(float(need.max()), 0.0), 0, passed, sample, worst
    )


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], atol=None, rtol=None, sample: int = 0, sides: tuple[str, str] = ("PyTorch", "ONNX")) -> list[OutputComparison]:
    """Outputs pair by position (PyTorch has no output names; ONNX's come from the exporter)
    and are named after the ``got`` side. A count mismatch fails on every unpaired output."""
    ref_items, got_items = list(ref.items()), list(got.items())
    out = [compare_arrays(gn, rv, gv, atol, rtol, sample, sides) for (_, rv), (gn, gv) in zip(ref_items, got_items)]
    counts = f"{sides[0]} returns {len(ref_items)} output(s), {sides[1]} {len(got_items)}"
    for rn, rv in ref_items[len(got_items):]:
        out.append(_failed(f"{rn} ({sides[0]} only)", rv.dtype.name, rv.shape, tolerance_for(atol, rn, 0.0), tolerance_for(rtol, rn, 0.0), sample, counts))
    for gn, gv in got_items[len(ref_items):]:
        out.append(_failed(f"{gn} ({sides[1]} only)", gv.dtype.name, gv.shape, tolerance_for(atol, gn, 0.0), tolerance_for(rtol, gn, 0.0), sample, counts))
    return out


def worst_of(comparisons: list[OutputComparison]) -> OutputComparison | None:
    """The comparison furthest from passing (failures first, then by needed rtol)."""
    if not comparisons:
        return None
    return max(comparisons, key=lambda c: (not c.passed, c.nonfinite_mismatch, c.min_rtol if np.isfinite(c.min_rtol) else 1e300, c.max_abs))


@dataclass
class NormDivergence:
    """One fused norm compared with the PyTorch module it came from."""

    index: int
    module: str
    onnx_node: str
    max_abs: float
    max_rel: float
    cosine: float
    passed: bool

    def to_json(self) -> dict:
        return {k: (_json_float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class ValidationReport:
    passed: bool
    samples: int
    outputs: list[OutputComparison]  # fused vs PyTorch, worst sample per output
    unfused: list[OutputComparison]  # unfused export vs PyTorch, same
    fused_vs_unfused: list[OutputComparison] = field(default_factory=list)
    first_divergence: NormDivergence | None = None
    norms: list[NormDivergence] = field(default_factory=list)
    backend: str = DEFAULT_BACKEND
    notes: list[str] = field(default_factory=list)
    stress: object = None  # normexport.stress.StressReport

    @property
    def worst(self) -> OutputComparison | None:
        return worst_of(self.outputs)

    def to_json(self) -> dict:
        worst = self.worst
        return {
            "passed": self.passed,
            "backend": self.backend,
            "samples": self.samples,
            "outputs": [c.to_json() for c in self.outputs],
            "unfused_outputs": [c.to_json() for c in self.unfused],
            "fused_vs_unfused": [c.to_json() for c in self.fused_vs_unfused],
            "worst_output": worst.name if worst else None,
            "first_divergent_norm": self.first_divergence.to_json() if self.first_divergence else None,
            "norms": [n.to_json() for n in self.norms],
            "stress": self.stress.to_json() if self.stress is not None else None,
            "notes": [plain_text(n) for n in self.notes],
        }


def plain_text(text: str) -> str:
    """Without terminal colour codes (exception texts from torch carry them): for JSON."""
    return ANSI.sub("", text)


def keep_worst(acc: dict[str, OutputComparison], comparisons: list[OutputComparison]) -> None:
    for c in comparisons:
        if c.name not in acc or worst_of([acc[c.name], c]) is c:
            acc[c.name] = c
