"""The CLI answers --help and usage errors without importing torch, onnx or a runtime: each
command imports them when it runs (bench/bench_cli_startup.py times it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_cli_startup import PROBE  # noqa: E402 (the benchmark's own probe: what it times is what is checked)

def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize(
    "args, code",
    [
        (["--help"], 0),
        (["convert", "--help"], 0),
        (["validate", "--help"], 0),
        (["bench", "--help"], 0),
        (["fuse", "--help"], 0),
        (["inspect", "--help"], 0),
        (["ln2rms", "--help"], 0),
        (["plugin", "--help"], 0),
        (["generate", "--help"], 0),
        (["convert"], 2),
        (["convert", "m.pt", "--bogus"], 2),
        (["convert", "m.pt", "--target", "nope"], 2),
    ],
)
def test_help_and_usage_errors_import_no_framework(args, code):
    p = _run(*args)
    assert p.returncode == code, p.stderr
    heavy = next(line[6:] for line in p.stderr.splitlines() if line.startswith("HEAVY="))
    assert heavy == "", f"`normexport {' '.join(args)}` imported {heavy}"
    if code == 2:
        assert p.stderr.startswith("error: ") and "\nhint: " in p.stderr


def test_help_lists_every_target_and_backend():
    """The choices come from the registries, read without importing their lowerings and runners."""
    from normexport.fuse.registry import TARGETS
    from normexport.runners import BACKENDS

    out = _run("convert", "--help").stdout
    for name in (*TARGETS, *BACKENDS):
        assert name in out
