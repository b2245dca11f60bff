"""What the fusion did: what was fused, into what, and what was left alone and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from normexport.errors import NormexportError
from normexport.fuse.patterns import FusedNorm


@dataclass
class Skipped:
    node: str
    reason: str
    module: str = ""


@dataclass
class FuseReport:
    target: str
    fused_norms: list[FusedNorm] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    opset_before: int | None = None
    opset_after: int | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def fused(self) -> int:
        return len(self.fused_norms)

    @property
    def newly_fused(self) -> int:
        return sum(1 for f in self.fused_norms if "already fused" not in f.pattern)

    @property
    def patterns(self) -> dict[str, int]:
        return dict(Counter(f.pattern for f in self.fused_norms))

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "fused": self.fused,
            "newly_fused": self.newly_fused,
            "patterns": self.patterns,
            "ops": dict(Counter(f.op for f in self.fused_norms)),
            "skipped": [asdict(s) for s in self.skipped],
            "norms": [asdict(f) for f in self.fused_norms],
            "opset": {"before": self.opset_before, "after": self.opset_after},
            "nodes": {"before": self.nodes_before, "after": self.nodes_after},
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


def require_norms(fusion: FuseReport, source, hint: str) -> None:
    """The one refusal of a model in which no RMSNorm was fused (convert, fuse, folders)."""
    if fusion.fused:
        return
    reasons = "; ".join(sorted({s.reason for s in fusion.skipped}))[:300]
    near = f" ({len(fusion.skipped)} near-miss(es): {reasons})" if fusion.skipped else ""
    raise NormexportError(f"no RMSNorm found in {source}{near}", f"normexport fuses x / sqrt(mean(x²) + eps) · g; {hint}")
