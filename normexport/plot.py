"""A bar chart of a BenchReport: latency per variant (median with p90 whiskers), and the
normalization share before and after fusion. matplotlib is an optional extra."""

from __future__ import annotations

from pathlib import Path

from normexport.errors import NormexportError


def plot_bench(report, path: str | Path, title: str = "latency") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NormexportError("--plot needs matplotlib", "pip install 'normexport[plot]'") from None
    from normexport import __version__, outputs

    names = list(report.latency_ms)
    med = [report.latency_ms[n].median for n in names]
    p90 = [report.latency_ms[n].p90 for n in names]
    colors = {"torch": "#7f7f7f", "onnx_unfused": "#d62728", "onnx_fused": "#2ca02c"}
    shares = report.norm_share
    fig, axes = plt.subplots(1, 2 if shares else 1, figsize=(11 if shares else 7, 4.2), gridspec_kw={"width_ratios": [2, 1]} if shares else None)
    ax = axes[0] if shares else axes
    bars = ax.bar(names, med, color=[colors.get(n, "#1f77b4") for n in names], yerr=[[0] * len(med), [max(p - m, 0) for p, m in zip(p90, med)]], capsize=6)
    for b, m in zip(bars, med):
        ax.annotate(f"{m:.3g} ms", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")
    base = report.latency_ms.get("onnx_unfused")
    fused = report.latency_ms.get("onnx_fused")
    sub = f"fused/unfused = {fused.median / base.median:.2f}x" if base and fused else ""
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    ax.set_ylabel("median latency, ms (whisker: p90)")
    if max(p90) > 20 * max(min(med), 1e-9):
        ax.set_yscale("log")  # one noisy variant would flatten the others' bars
    ax.grid(axis="y", alpha=0.3)
    if shares:
        ax2 = axes[1]
        keys = list(shares)
        ax2.bar(keys, [100 * shares[k] for k in keys], color=[colors.get(k, "#1f77b4") for k in keys])
        for i, k in enumerate(keys):
            ax2.annotate(f"{100 * shares[k]:.1f}%", (i, 100 * shares[k]), ha="center", va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")
        ax2.set_title("time in normalization ops\n(onnxruntime profiler)", fontsize=10)
        ax2.set_ylabel("% of summed node time")
        ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:  # marked as normexport's: an existing file at --plot is replaced only when it carries the mark
        meta = {"Software": f"{outputs.PLOT_SOFTWARE} {__version__}"}
        outputs.write_with(Path(path), lambda tmp: fig.savefig(str(tmp), format="png", dpi=110, metadata=meta))
    finally:
        plt.close(fig)
