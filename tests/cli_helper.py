"""Running the normexport CLI in-process for tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from click.testing import CliRunner

from normexport.cli import main


def invoke(*args, cwd: Path | None = None):
    """``normexport ARGS`` in this process (from ``cwd`` if given); stdout and stderr apart."""
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): a file's sha256, a link's target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


def assert_refused(result, out: Path, *words):
    """Exit 2 with one `error:` and one `hint:` line naming ``words``; nothing at ``out`` and no
    temp folder beside it."""
    assert result.exit_code == 2, result.output + result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    for w in words:
        assert w in result.stderr, result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".normexport-")]
