"""What converting a Hugging Face folder costs: `normexport convert DIR` (load, export, fuse,
generation check against transformers, write) against onnxruntime-genai's model builder
(`-p fp32 -e cpu`, which writes without checking anything), each in its own process under
``/usr/bin/time -v``: CPU seconds (user + system, and each), wall seconds and peak RSS. normexport's
report adds CPU seconds and the peak RSS reached by the end of each step. Then the time
onnxruntime-genai takes to load each written folder, and the system CPU seconds this machine
spends writing the weights' size to disk (before and after the rounds: on a virtual machine that
hands freed memory back to its host, first touches of memory cost system time, and that moves
both tools' numbers between runs).

The folder has Qwen2-0.5B's shapes with random weights (bench/qwen05_folder.py); nothing is
downloaded. Bounds checked: CPU <= 3x the builder's, peak RSS <= 1.5x the fp32 weights + 1 GiB.

With ``--rounds N`` the two conversions alternate N times; the table gives the median of each
column and the ratio of the medians (the machine is shared: one round can be off).

    nice python bench/bench_convert_cost.py [--work DIR] [--skip-builder] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import machine_line  # noqa: E402
from qwen05_folder import save_qwen05  # noqa: E402


def timed(cmd: list[str], env: dict) -> dict:
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({r.returncode}): {r.stderr.strip().splitlines()[-3:]}")
    field = lambda name: re.search(rf"{name}: (.+)", r.stderr).group(1).strip()  # noqa: E731
    wall = field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\)").split(":")
    user, system = float(field("User time \\(seconds\\)")), float(field("System time \\(seconds\\)"))
    return {
        "cpu_s": user + system, "user_s": user, "sys_s": system,
        "wall_s": sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall))),
        "peak_rss_gib": int(field("Maximum resident set size \\(kbytes\\)")) / 2**20,
    }


def write_cost(work: Path, size: int) -> float:
    """System CPU seconds this machine spends writing and fsyncing ``size`` bytes (both tools
    write the weights once; on a virtual disk that cost moves between runs)."""
    probe = work / "write-probe"
    before = os.times()
    with open(probe, "wb") as f:
        block = b"\0" * (16 << 20)
        for _ in range(max(1, size // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    after = os.times()
    probe.unlink()
    return after.system - before.system


LOAD_SCRIPT = """
import os, sys, time
import onnxruntime_genai as og
before, start = os.times(), time.perf_counter()
model = og.Model(sys.argv[1])
after = os.times()
print(time.perf_counter() - start, after.user + after.system - before.user - before.system)
"""


def genai_loads(folders: dict[str, Path], env: dict, rounds: int = 3) -> dict[str, list[tuple[float, float]]]:
    """(wall s, CPU s) of ``og.Model(folder)`` in a fresh process, the folders alternating."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in folders}
    for _ in range(rounds):
        for name, folder in folders.items():
            r = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(folder)], capture_output=True, text=True, env=env)
            if r.returncode != 0:
                return {}
            wall, cpu = map(float, r.stdout.split())
            times[name].append((wall, cpu))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="where the folder and the outputs go (default: a temp folder, removed)")
    p.add_argument("--skip-builder", action="store_true")
    p.add_argument("--rounds", type=int, default=1, help="alternate the two conversions this many times (medians)")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-convert-cost-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    try:
        folder = save_qwen05(work / "qwen05")
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
        load = os.getloadavg()
        probe_before = write_cost(work, int(weights * 2**30))
        rows: dict[str, list[dict]] = {}
        rep = work / "normexport.json"
        ours_name, builder_name = "normexport convert (fp32, --target ort, checked)", "onnxruntime-genai builder (fp32, cpu, unchecked)"
        reports = []
        for _ in range(max(1, a.rounds)):
            for out in ("normexport", "builder"):
                shutil.rmtree(work / out, ignore_errors=True)
            rows.setdefault(ours_name, []).append(timed([sys.executable, "-m", "normexport.cli", "convert", str(folder), "-o", str(work / "normexport"), "--report", str(rep)], env))
            reports.append(json.loads(rep.read_text()))
            if not a.skip_builder:
                rows.setdefault(builder_name, []).append(timed([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(work / "builder"), "-p", "fp32", "-e", "cpu", "-c", str(work / "builder-cache")], env))
        per_round = rows
        rows = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in per_round.items()}
        report = reports[-1]
        print(f"\n{machine_line(1)}; load average at the start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, at the end " + "%.1f/%.1f/%.1f" % os.getloadavg())
        print(f"Qwen2-0.5B shapes, random weights: {weights:.2f} GiB of fp32 weights; RSS bound 1.5 x {weights:.2f} + 1 = {1.5 * weights + 1:.2f} GiB\n")
        print(f"{max(1, a.rounds)} round(s); medians" if a.rounds > 1 else "one round")
        print("| convert | CPU s | user s | system s | wall s | peak RSS GiB |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, r in rows.items():
            print(f"| {name} | {r['cpu_s']:.1f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} |")
        print(f"\nwriting {weights:.2f} GiB and fsyncing it cost {probe_before:.1f} system CPU s before the rounds, {write_cost(work, int(weights * 2**30)):.1f} after")
        if a.rounds > 1:
            for name, runs in per_round.items():
                print(f"\n{name}, per round: CPU s " + ", ".join(f"{r['cpu_s']:.1f}" for r in runs) + "; peak RSS GiB " + ", ".join(f"{r['peak_rss_gib']:.2f}" for r in runs))
        print("\nnormexport's steps (its report, last round): " + ", ".join(f"{k} {report['steps_s'][k]:.1f} s wall / {report['steps_cpu_s'][k]:.1f} s CPU, peak RSS by then {report['peak_rss_mib_after'][k] / 1024:.2f} GiB" for k in report["steps_s"]))
        print(f"generation check passed: {report['generation']['passed']}; attention: {report['attention_op']}")
        loads = genai_loads({ours_name: work / "normexport", builder_name: work / "builder"}, env) if not a.skip_builder else {}
        for name, runs in loads.items():
            print(f"\nonnxruntime-genai loading the folder of {name} (og.Model, fresh process): CPU s " + ", ".join(f"{c:.1f}" for _, c in runs)
                  + "; wall s " + ", ".join(f"{w:.1f}" for w, _ in runs))
        if len(rows) == 2:
            ours, builder = rows.values()
            print(f"\nCPU ratio {ours['cpu_s'] / builder['cpu_s']:.2f}x the builder's (bound 3x; user time alone {ours['user_s'] / builder['user_s']:.2f}x); peak RSS {ours['peak_rss_gib']:.2f} GiB (bound {1.5 * weights + 1:.2f})")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
