"""Running the normexport CLI in-process for tests."""

from __future__ import annotations

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
