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
