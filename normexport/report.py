"""Print reports as rich tables; write them as JSON (atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from normexport import __version__, outputs
from normexport.jsonvalues import strict
from normexport.outputs import REPORT_MARKER


def console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal:  # piped or captured: don't squeeze the tables into 80 columns
        c = Console(stderr=stderr, highlight=False, width=160)
    return c


def plain(data):
    """``data`` with every string free of terminal colour codes (torch's exception texts carry
    them into notes), for JSON."""
    from normexport.validate import plain_text

    if isinstance(data, str):
        return plain_text(data)
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [plain(v) for v in data]
    return data


def json_text(data, indent: int | None = 2) -> str:
    """Strict JSON text of a report (``strict``; anything else JSON cannot hold as its str)."""
    return json.dumps(strict(plain(data)), indent=indent, default=str, allow_nan=False)


def write_json(data: dict, path: str | Path) -> None:
    """Write a report atomically, marked as normexport's (an existing file at --report is
    replaced only when it carries that mark, or with --force); strings free of colour codes,
    strict JSON (no bare NaN or Infinity)."""
    outputs.write_text(path, json_text({REPORT_MARKER: __version__, **data}) + "\n")


def _fmt(v, digits=3) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return "-"
    if v == float("inf"):
        return "inf"
    if v == 0:
        return "0"
    if abs(v) < 1e-3 or abs(v) >= 1e5:
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def print_fusion(c: Console, fusion, title: str = "Fusion") -> None:
    from normexport.fuse.registry import target_record

    done = "fused" if target_record(fusion.target).ops else "found and decomposed"  # a target of primitive ops
    t = Table(title=f"{escape(title)}: {fusion.fused} RMSNorm {done} for target '{escape(fusion.target)}'", title_justify="left")
    t.add_column("pattern")
    t.add_column("count", justify="right")
    for name, n in sorted(fusion.patterns.items()):
        t.add_row(escape(name), str(n))
    ops = {}
    for f in fusion.fused_norms:
        ops[f.op] = ops.get(f.op, 0) + 1
    for op, n in ops.items():
        t.add_row(f"[dim]-> {escape(op)}[/dim]", f"[dim]{n}[/dim]")
    c.print(t)
    if fusion.skipped:
        s = Table(title=f"Left alone: {len(fusion.skipped)} near-miss(es)", title_justify="left")
        s.add_column("node")
        s.add_column("reason")
        for sk in fusion.skipped:
            s.add_row(escape(sk.node), escape(sk.reason))
        c.print(s)
    for note in fusion.notes:
        c.print(f"[dim]note: {escape(note)}[/dim]")
    c.print(f"[dim]nodes {fusion.nodes_before} -> {fusion.nodes_after}, opset {fusion.opset_before} -> {fusion.opset_after}, {fusion.seconds:.2f} s[/dim]")


def print_validation(c: Console, v) -> None:
    if v is None:
        return
    status = "[green]PASSED[/green]" if v.passed else "[bold red]FAILED[/bold red]"
    t = Table(title=f"Validation vs PyTorch ({escape(v.backend)}, {v.samples} sample(s), graph optimizations off): {status}", title_justify="left")
    for col in ("output", "run", "max abs", "max rel", "mean abs", "cosine", "min atol", "min rtol", "atol/rtol", "ok"):
        t.add_column(col, justify="right" if col not in ("output", "run") else "left")
    rows = [("fused", c_) for c_ in v.outputs] + [("unfused", c_) for c_ in v.unfused]
    for run, cmp in rows:
        t.add_row(
            escape(cmp.name), run, _fmt(cmp.max_abs), _fmt(cmp.max_rel), _fmt(cmp.mean_abs), f"{cmp.cosine:.6f}" if cmp.cosine == cmp.cosine else "nan",
            _fmt(cmp.min_atol), _fmt(cmp.min_rtol), f"{_fmt(cmp.atol)}/{_fmt(cmp.rtol)}",
            "[green]yes[/green]" if cmp.passed else f"[red]NO{' (NaN/Inf x' + str(cmp.nonfinite_mismatch) + ')' if cmp.nonfinite_mismatch else ''}[/red]",
        )
    c.print(t)
    for run, cmp in rows:
        if cmp.problem:
            c.print(f"[red]{escape(cmp.name)} ({run}, sample {cmp.sample}): {escape(cmp.problem)}[/red]")
    if not v.passed and v.worst is not None and not v.worst.problem:
        w = v.worst
        c.print(f"[red]worst output: {escape(w.name)}: max abs {_fmt(w.max_abs)}, max rel {_fmt(w.max_rel)} at index {w.worst_index} (sample {w.sample}); needs atol >= {_fmt(w.min_atol)} or rtol >= {_fmt(w.min_rtol)}[/red]")
    if v.first_divergence is not None:
        d = v.first_divergence
        c.print(f"[red]first diverging norm: #{d.index} {escape(d.module or '?')} (ONNX {escape(str(d.onnx_node))}): max abs {_fmt(d.max_abs)}, max rel {_fmt(d.max_rel)}, cosine {d.cosine:.6f}[/red]")
    elif not v.passed and v.norms:
        c.print("[yellow]every fused norm matches its PyTorch module: the divergence is elsewhere[/yellow]")
    for note in v.notes:
        c.print(f"[dim]note: {escape(note)}[/dim]")
    print_stress(c, v.stress)


def print_stress(c: Console, s) -> None:
    """One row per fused norm run alone on large-magnitude, tiny and zero rows."""
    if s is None:
        return
    status = "[green]PASSED[/green]" if s.passed else "[bold red]FAILED[/bold red]"
    if not s.norms:
        status = "[yellow]no norm checked[/yellow]"
    t = Table(title=f"Stress: each fused norm alone ({escape(s.backend)}) vs float64 RMSNorm: {status}", title_justify="left")
    for col in ("#", "module", "op", "dtype", "max |x|", "max abs", "max rel", "vs unfused", "ok", "failing rows"):
        t.add_column(col, justify="right" if col in ("#", "max |x|", "max abs", "max rel", "vs unfused") else "left")
    for n in s.norms:
        r, u = n.vs_reference, n.vs_unfused
        nonfinite = f" (NaN/Inf x{r.nonfinite_mismatch})" if r.nonfinite_mismatch else ""
        t.add_row(
            str(n.index), escape(n.module or n.node), escape(n.op), escape(n.dtype), _fmt(n.max_input), _fmt(r.max_abs) + nonfinite, _fmt(r.max_rel),
            _fmt(u.max_abs) if u is not None else "-", "[green]yes[/green]" if n.passed else "[red]NO[/red]", escape(", ".join(n.failed_rows)) or "-",
        )
    if s.norms:
        c.print(t)
    else:
        c.print(f"Stress: {status}")
    for name, reason in s.not_checked:
        c.print(f"[yellow]not stressed: {escape(name)}: {escape(reason)}[/yellow]")
    for n in s.failed:
        c.print(f"[red]norm {escape(n.module or n.node)} (ONNX {escape(n.node)}) fails the stress check on: {escape(', '.join(n.failed_rows))}[/red]")
    for note in s.notes:
        c.print(f"[dim]note: {escape(note)}[/dim]")


def print_bench(c: Console, b) -> None:
    if b is None:
        return
    t = Table(title=f"Latency ({b.threads} thread(s), {b.warmup} warm-up, {b.iters} runs, {b.input_sets} input sets rotated)", title_justify="left")
    for col in ("variant", "median ms", "p90 ms", "min ms", "runs/s", "vs unfused", "norm share"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    base = b.latency_ms.get("onnx_unfused")
    for name, lat in b.latency_ms.items():
        ratio = f"{lat.median / base.median:.2f}x" if base is not None and base.median > 0 else "-"
        share = b.norm_share.get(name)
        t.add_row(escape(name), _fmt(lat.median, 4), _fmt(lat.p90, 4), _fmt(lat.min, 4), _fmt(lat.runs_per_s, 4), ratio, f"{share:.1%}" if share is not None else "-")
    c.print(t)
    for note in b.notes:
        c.print(f"[dim]note: {escape(note)}[/dim]")
    r = b.ratio("onnx_fused", "onnx_unfused")
    if r is not None:
        c.print(f"fused / unfused median latency: [bold]{r:.3f}[/bold] ({(1 - r) * 100:+.1f}% time saved)" if r < 1 else f"fused / unfused median latency: [bold]{r:.3f}[/bold] (no gain in this run)")


def print_convert(c: Console, r) -> None:
    c.print(f"[bold]{escape(r.model)}[/bold] ({escape(r.kind)}) -> {escape(r.exporter)} exporter, opset {r.opset}, {'dynamic batch/sequence' if r.dynamic else 'static shapes'}")
    c.print("inputs: " + escape(", ".join(f"{i['name']}:{i['dtype']}:{'x'.join(map(str, i['shape']))}" for i in r.inputs)))
    if r.fusion:
        print_fusion(c, r.fusion)
    if getattr(r, "residual", ""):
        c.print(escape(r.residual))
    print_validation(c, r.validation)
    if getattr(r, "quantization", None) is not None:
        from normexport.quant_check import print_quantized

        print_quantized(c, r.quantization, r.quantized_accuracy)
    print_bench(c, r.bench)
    for note in r.notes:
        c.print(f"[dim]note: {escape(note)}[/dim]")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in r.steps.items())
    c.print(f"[dim]{steps}[/dim]")
    if r.written:
        c.print(f"wrote [bold]{escape(str(r.output))}[/bold]")


def print_inspect(c: Console, r: dict) -> None:
    c.print(f"[bold]{escape(str(r['model']))}[/bold] ({escape(str(r['kind']))})")
    if r.get("modules"):
        t = Table(title="PyTorch norm modules", title_justify="left")
        for col in ("module", "class", "eps", "weight", "status", "reason"):
            t.add_column(col)
        for m in r["modules"]:
            t.add_row(*map(escape, (m["module"], m["class"], _fmt(m["eps"]) if m["eps"] is not None else "-", str(m["weight"] or "-"), m["status"], m["reason"])))
        c.print(t)
    t = Table(title=f"RMSNorm subgraphs normexport fuses: {len(r['norms'])}", title_justify="left")
    for col in ("#", "module", "pattern", "eps", "axis", "dtype", "scale", "bias", "residual"):
        t.add_column(col)
    for i, n in enumerate(r["norms"]):
        t.add_row(str(i), escape(n["module"] or "-"), escape(n["pattern"]), _fmt(n["epsilon"]), escape(str(n["axis"])), escape(str(n["dtype"])), "yes" if n["scale"] else "no", "yes" if n["bias"] else "no", "yes" if n["residual"] else "no")
    c.print(t)
    if r["near_misses"]:
        t = Table(title=f"Near-misses (left alone): {len(r['near_misses'])}", title_justify="left")
        for col in ("node", "module", "reason"):
            t.add_column(col)
        for s in r["near_misses"]:
            t.add_row(escape(str(s["node"])), escape(s.get("module") or "-"), escape(str(s["reason"])))
        c.print(t)
    for note in r.get("notes", []):
        c.print(f"[dim]note: {escape(note)}[/dim]")
