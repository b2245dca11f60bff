"""Compare ONNX runs against PyTorch on the same seeded inputs, output by output.

A run passes where every element satisfies |got - ref| <= atol + rtol·|ref| (numpy's
allclose), and fails wherever got has NaN or Inf that the reference has not (or the other
way round). Each comparison also says the smallest atol (at the given rtol) and the smallest
rtol (at the given atol) that would pass, so a user sees how far from the line a run is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

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
    nonfinite_mismatch: int  # elements where one side is NaN/Inf and the other is not (or differs)
    passed: bool
    sample: int = 0
    worst_index: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {k: (_json_float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _json_float(v: float):
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, atol: float | None = None, rtol: float | None = None, sample: int = 0) -> OutputComparison:
    dt = np.dtype(ref.dtype)
    d_atol, d_rtol = default_tolerance(dt)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if ref.shape != got.shape:
        return OutputComparison(name, dt.name, list(ref.shape), float("inf"), float("inf"), float("inf"), float("nan"), atol, rtol, float("inf"), float("inf"), 0, False, sample)
    r = ref.astype(np.float64) if dt.kind == "f" or dt.name == "bfloat16" else ref.astype(np.float64)
    g = got.astype(np.float64)
    fin_r, fin_g = np.isfinite(r), np.isfinite(g)
    # Same non-finite value on both sides (NaN and NaN, +Inf and +Inf) is agreement.
    same_nonfinite = (~fin_r & ~fin_g) & ((np.isnan(r) & np.isnan(g)) | (r == g))
    bad_nonfinite = ~(fin_r & fin_g) & ~same_nonfinite
    both = fin_r & fin_g
    diff = np.where(both, np.abs(g - r), 0.0)
    mag = np.abs(np.where(both, r, 0.0))
    max_abs = float(diff.max()) if diff.size else 0.0
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        rel = diff / np.maximum(mag, np.finfo(np.float64).tiny)
    rel = np.where(diff == 0, 0.0, rel)
    max_rel = float(rel.max()) if rel.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    rf, gf = np.where(both, r, 0).ravel(), np.where(both, g, 0).ravel()
    denom = np.linalg.norm(rf) * np.linalg.norm(gf)
    cosine = float(rf @ gf / denom) if denom > 0 else (1.0 if np.array_equal(rf, gf) else 0.0)
    min_atol = float(np.max(diff - rtol * mag)) if diff.size else 0.0
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        need = np.where(diff > atol, (diff - atol) / np.maximum(mag, np.finfo(np.float64).tiny), 0.0)
    min_rtol = float(need.max()) if need.size else 0.0
    n_bad = int(bad_nonfinite.sum())
    if n_bad:
        min_atol = min_rtol = max_abs = max_rel = float("inf")
    passed = n_bad == 0 and bool(np.all(diff <= atol + rtol * mag))
    worst = list(np.unravel_index(int(np.argmax(np.where(bad_nonfinite, np.inf, diff))), diff.shape)) if diff.size else []
    return OutputComparison(
        name, dt.name, list(ref.shape), max_abs, max_rel, mean_abs, cosine, atol, rtol, max(min_atol, 0.0), max(min_rtol, 0.0), n_bad, passed, sample, [int(i) for i in worst]
    )


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], atol=None, rtol=None, sample: int = 0) -> list[OutputComparison]:
    if len(ref) != len(got):
        raise ValueError(f"reference has {len(ref)} outputs, candidate {len(got)}")
    # Outputs pair by position: PyTorch has no output names, ONNX's come from the exporter.
    return [compare_arrays(gn, ref[rn], got[gn], atol, rtol, sample) for rn, gn in zip(ref, got)]


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
    backend: str = "ort-cpu"
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
            "notes": self.notes,
        }


def keep_worst(acc: dict[str, OutputComparison], comparisons: list[OutputComparison]) -> None:
    for c in comparisons:
        if c.name not in acc or worst_of([acc[c.name], c]) is c:
            acc[c.name] = c
