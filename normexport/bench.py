"""Latency of PyTorch eager, the unfused and the fused ONNX model, side by side in one run,
and the share of time onnxruntime spends in normalization before and after fusion.

Each variant runs with the settings a user deploys with (onnxruntime's default graph
optimizations), the same thread count, after warm-up, on several input sets rotated so that
caches do not flatter any of them.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from normexport.fuse.registry import NORM_OPS
from normexport.runners.base import Runner



@dataclass
class Latency:
    median: float
    p90: float
    min: float
    mean: float
    runs_per_s: float
    iters: int

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ms = sorted(s * 1e3 for s in seconds)
        p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
        med = statistics.median(ms)
        return cls(med, p90, ms[0], statistics.fmean(ms), 1e3 / med if med > 0 else float("inf"), len(ms))


@dataclass
class BenchReport:
    threads: int
    warmup: int
    iters: int
    input_sets: int
    latency_ms: dict[str, Latency] = field(default_factory=dict)
    norm_share: dict[str, float] = field(default_factory=dict)  # variant -> fraction of op time in norms
    notes: list[str] = field(default_factory=list)

    def ratio(self, a: str, b: str) -> float | None:
        if a in self.latency_ms and b in self.latency_ms and self.latency_ms[b].median > 0:
            return self.latency_ms[a].median / self.latency_ms[b].median
        return None

    def to_json(self) -> dict:
        ratios = {}
        for a, b in (("onnx_fused", "onnx_unfused"), ("onnx_fused", "torch"), ("onnx_unfused", "torch")):
            r = self.ratio(a, b)
            if r is not None:
                ratios[f"{a}/{b}"] = round(r, 4)
        return {
            "threads": self.threads,
            "warmup": self.warmup,
            "iters": self.iters,
            "input_sets": self.input_sets,
            "latency_ms": {k: {kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in asdict(v).items()} for k, v in self.latency_ms.items()},
            "ratios": ratios,
            "norm_share": {k: round(v, 4) for k, v in self.norm_share.items()},
            "notes": self.notes,
        }


def interleaved(runners: dict[str, Runner], feeds: list[dict], warmup: int, iters: int, rounds: int = 5) -> dict[str, Latency]:
    """Time the variants in alternating rounds, so that a noisy neighbour on a shared machine
    slows all of them alike instead of one."""
    for r in runners.values():
        for i in range(warmup):
            r.infer(feeds[i % len(feeds)])
    rounds = max(1, min(rounds, iters))
    samples: dict[str, list[float]] = {k: [] for k in runners}
    done = 0
    for rnd in range(rounds):
        n = iters // rounds + (1 if rnd < iters % rounds else 0)  # exactly `iters` in all
        for name, r in runners.items():
            for i in range(n):
                samples[name].append(r.time_once(feeds[(done + i) % len(feeds)]))
        done += n
    return {k: Latency.of(v) for k, v in samples.items()}


def norm_share(model, feeds: list[dict], threads: int, iters: int, norm_nodes: set[str] | None = None, warmup: int = 2, backend=None) -> float:
    """Fraction of onnxruntime's summed node time spent in normalization, from its profiler,
    over ``iters`` runs after ``warmup`` runs on ``backend`` (an onnxruntime backend's record;
    None: the default backend). A node counts as normalization if its op is a norm op or its
    name is in ``norm_nodes`` (the primitive ops of an unfused norm)."""
    from normexport.runners import DEFAULT_BACKEND, backend_record
    from normexport.runners.ort import OrtRunner

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "prof")
        runner = OrtRunner(model, backend or backend_record(DEFAULT_BACKEND), optimize=True, threads=threads, profile_prefix=prefix)
        with runner:
            for i in range(warmup + iters):
                runner.infer(feeds[i % len(feeds)])
            path = runner.end_profiling()
        events = json.loads(Path(path).read_text())
    runs = sorted(ev["ts"] for ev in events if ev.get("cat") == "Session" and ev.get("name") == "model_run")
    start = runs[warmup] if len(runs) > warmup else 0  # the profiler records from session start
    total = norm = 0.0
    names = norm_nodes or set()
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time") or ev.get("ts", 0) < start:
            continue
        dur = float(ev.get("dur", 0))
        total += dur
        node_name = ev["name"][: -len("_kernel_time")]
        op = ev.get("args", {}).get("op_name", "")
        if op in NORM_OPS or node_name in names:
            norm += dur
    return norm / total if total > 0 else 0.0


def unfused_norm_node_names(model_path) -> set[str]:
    """Names of the nodes that make up each RMSNorm chain of an unfused model, found by the
    same pattern the fusion uses (fused on a copy; the chain's nodes are those it removed)."""
    import onnx_ir as ir

    from normexport.fuse import fuse_model
    from normexport.fuse.registry import PLAIN_TARGET

    before = ir.load(str(model_path))
    names_before = {n.name for n in before.graph}
    fuse_model(before, PLAIN_TARGET, residual=False)  # the residual Adds are not norm time
    names_after = {n.name for n in before.graph}
    return names_before - names_after


def feeds_numpy(feeds) -> list[dict[str, np.ndarray]]:
    from normexport.runners.torch_runner import to_numpy

    return [{k: to_numpy(v) for k, v in f.items()} for f in feeds]


def ort_norm_ops(model_path, backend=None) -> dict[str, int]:
    """The normalization ops onnxruntime runs for a model after its own graph optimizer
    (default level) on ``backend`` (an onnxruntime backend's record; None: the default
    backend): shows when onnxruntime already fuses an 'unfused' export itself."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    from normexport.runners import DEFAULT_BACKEND, backend_record

    providers = list((backend or backend_record(DEFAULT_BACKEND)).providers)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(model_path), so, providers=providers)
        m = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return dict(Counter(n.op_type for n in m.graph.node if n.op_type in NORM_OPS))
