"""Helpers shared by the CPU benchmark scripts in bench/ (bench_convert, bench_gpt3_norms,
bench_fuse_scale): the machine description, torch.onnx (dynamo) export without its chatter,
the ops onnxruntime's optimizer leaves in a graph, a numpy memcpy as a runner, and markdown.

Timing itself is normexport's (``normexport.bench.interleaved``, ``norm_share``); nothing here
re-implements it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from normexport.runners.base import Runner  # noqa: E402
from normexport.fuse.registry import NORM_OPS  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(threads: int) -> str:
    """One line: CPU model, logical CPUs, the thread count used, and the library versions."""
    import onnxruntime
    import torch

    try:
        import onnx

        onnx_v = onnx.__version__
    except Exception:
        onnx_v = "?"
    try:
        load = "load avg %.1f/%.1f/%.1f" % os.getloadavg()
    except OSError:
        load = "load avg ?"
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, {threads} thread(s) used; "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, onnx {onnx_v}, "
        f"numpy {np.__version__}, Python {platform.python_version()}; {load} at start"
    )


def command_line() -> str:
    """The command as typed from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join([".venv/bin/python", script, *sys.argv[1:]])


# ---------------------------------------------------------------------------------------------
# Export


@contextlib.contextmanager
def quiet():
    """torch.onnx / torch.export print progress, warnings and a torchvision notice per export."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "torch._export", "torch")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_dynamo(module, args: tuple, path: str | os.PathLike, opset: int = 18, input_names: list[str] | None = None) -> Path:
    """``torch.onnx.export(dynamo=True)`` at ``opset`` with static shapes, written to ``path``
    (weights inline below 2 GB)."""
    import torch

    path = Path(path)
    module.eval()
    with quiet(), torch.no_grad():
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names, verbose=False)
    import onnx

    proto = prog.model_proto
    onnx.save_model(proto, str(path))
    return path


def fuse_copy(src: str | os.PathLike, dst: str | os.PathLike, target: str = "ort", residual: bool = True):
    """normexport's fusion of ``src`` for ``target`` written to ``dst``; returns the FuseReport."""
    from normexport.fuse import fuse_model, load_onnx, save_onnx

    model = load_onnx(src)
    report = fuse_model(model, target, residual=residual)
    save_onnx(model, dst)
    return report


# ---------------------------------------------------------------------------------------------
# What onnxruntime runs


def ort_optimized_graph(path: str | os.PathLike, threads: int):
    """The graph (onnx.GraphProto, no weights) onnxruntime runs after its default
    (ORT_ENABLE_ALL) graph optimizations on CPU."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.optimized_model_filepath = out
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load_model(out, load_external_data=False).graph


def op_counts(graph) -> Counter:
    """Op types (``domain::op`` outside the default domain) of an onnx.GraphProto."""
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in graph.node)


def ort_optimized_ops(path: str | os.PathLike, threads: int) -> Counter:
    """Op types of the graph onnxruntime runs after its default optimizations on CPU."""
    return op_counts(ort_optimized_graph(path, threads))




def norm_ops(counts: Counter) -> dict[str, int]:
    """The normalization ops among ``counts`` (any domain)."""
    return {k: v for k, v in sorted(counts.items()) if k.split("::")[-1] in NORM_OPS}


def fmt_ops(d: dict[str, int]) -> str:
    return ", ".join(f"{v}x {k.split('::')[-1]}" for k, v in d.items()) or "none"


def profile_norm_ops(path, feeds: list[dict], threads: int, iters: int, skip: int = 2, chain: set[str] | None = None) -> dict:
    """Microseconds per call that onnxruntime's profiler gives each norm op type (and, for an
    unfused chain, each op of the nodes named in ``chain``, as ``chain:Op``), over ``iters``
    calls after ``skip`` unprofiled-in-effect warm-up calls; with the total kernel time per call.
    A breakdown beside ``normexport.bench.norm_share``, which profiles from the first call."""
    import json

    from normexport.runners import DEFAULT_BACKEND, backend_record
    from normexport.runners.ort import OrtRunner

    chain = chain or set()
    with tempfile.TemporaryDirectory() as tmp:
        runner = OrtRunner(path, backend_record(DEFAULT_BACKEND), optimize=True, threads=threads, profile_prefix=os.path.join(tmp, "prof"))
        with runner:
            for i in range(skip + iters):
                runner.infer(feeds[i % len(feeds)])
            events = json.loads(Path(runner.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = runs[skip] if len(runs) > skip else 0
    per: dict[str, float] = {}
    total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        dur = float(e.get("dur", 0))
        total += dur
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "")
        if op in NORM_OPS:
            per[op] = per.get(op, 0.0) + dur
        elif node in chain:
            per[f"chain:{op}"] = per.get(f"chain:{op}", 0.0) + dur
    n = max(1, len(runs) - skip)
    norm = sum(per.values())
    return {"per_op_us": {k: v / n for k, v in sorted(per.items())}, "norm_us": norm / n, "total_us": total / n,
            "share": norm / total if total else 0.0, "calls": n}


# ---------------------------------------------------------------------------------------------
# A memcpy as a runner (so normexport.bench.interleaved times it in the same rounds)


class NumpyCopyRunner(Runner):
    """``np.copyto(dst, feed[name])`` into one preallocated array: a single-threaded memcpy
    of the same bytes (read x, write y)."""

    name = "np.copyto"

    def __init__(self, input_name: str, like: np.ndarray):
        self.input_name = input_name
        self.dst = np.empty_like(like)
        self.dst.fill(0)  # fault the pages in now, not in the first timed call

    @property
    def output_names(self) -> list[str]:
        return ["y"]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        np.copyto(self.dst, feed[self.input_name])
        return {"y": self.dst}


def identity_model(path: str | os.PathLike, name: str, shape: tuple[int, ...], opset: int = 18) -> Path:
    """An ONNX model whose one node is ``Identity(name) -> y`` (a copy inside onnxruntime)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    graph = helper.make_graph([helper.make_node("Identity", [name], ["y"], name="copy")], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Markdown


def md_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; ``align`` is one letter per column (l/r), right by default after the first."""
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def ms(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"
