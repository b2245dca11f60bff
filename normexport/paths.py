"""The one gate every input file passes before it is opened (models, ONNX files, factories)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from normexport.errors import NormexportError


def require_regular_file(path: str | os.PathLike, what: str = "MODEL") -> Path:
    """The one gate every input file passes before it is opened: it must exist and be a
    regular file (after symlinks). A FIFO, device, socket or directory is refused from its
    ``os.stat`` alone, never opened (a FIFO blocks, /dev/zero never ends)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NormexportError(f"{path}: no such file", "check the path") from None
    except OSError as e:
        raise NormexportError(f"{path}: cannot read it ({e.strerror})", "check the path and its permissions") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise NormexportError(f"{path} is a directory, not a file", f"pass the {what} file itself")
    kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
    raise NormexportError(f"{path} is {kind}, not a regular file", f"pass the {what} as a regular file (copy it into one)")
