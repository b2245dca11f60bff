"""How long the CLI takes to answer without doing any work: `normexport --help`,
`normexport convert --help`, and a click usage error (`convert` without MODEL, an unknown
option). Each is a fresh `python -m normexport.cli` process (the interpreter's own start
included), timed wall-clock; the table gives the median and max of N runs, and which of torch,
onnx, onnx_ir, onnxscript, onnxruntime, transformers the process imported (none, by design:
commands import them when they run).

    python bench/bench_cli_startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnx", "onnx_ir", "onnxscript", "onnxruntime", "transformers")
CASES = (
    ("normexport --help", ["--help"], 0),
    ("normexport convert --help", ["convert", "--help"], 0),
    ("normexport convert (no MODEL: usage error)", ["convert"], 2),
    ("normexport convert m.pt --bogus (unknown option)", ["convert", "m.pt", "--bogus"], 2),
)
# Runs the CLI like `normexport ...`, then names the heavy modules it imported.
PROBE = (
    "import sys\n"
    "from normexport.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:], prog_name='normexport')\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
    "sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n')\n"
    "sys.exit(code)\n"
)


def run_once(args: list[str], probe: bool) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", PROBE, *args] if probe else [sys.executable, "-m", "normexport.cli", *args]
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    heavy = next((line[6:] for line in p.stderr.splitlines() if line.startswith("HEAVY=")), "")
    return seconds, p.returncode, heavy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"Python {platform.python_version()}, {os.cpu_count()} logical CPUs; load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} at start; {args.runs} runs each\n")
    print("| command | median s | max s | exit | heavy modules imported |")
    print("| --- | ---: | ---: | ---: | --- |")
    run_once(["--help"], probe=False)  # the file cache warm, as for any second call
    for label, argv, want in CASES:
        times, codes = [], set()
        for _ in range(args.runs):
            seconds, code, _ = run_once(argv, probe=False)
            times.append(seconds)
            codes.add(code)
        _, _, heavy = run_once(argv, probe=True)
        assert codes == {want}, f"{label}: exit {codes}, expected {want}"
        print(f"| `{label}` | {statistics.median(times):.2f} | {max(times):.2f} | {want} | {heavy or 'none'} |")
    load = os.getloadavg()
    print(f"\nload avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} at the end")


if __name__ == "__main__":
    main()
