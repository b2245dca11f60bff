"""The gates input paths pass before they are opened (models, ONNX files, factories)."""

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


def require_usable_path(path: str | os.PathLike) -> Path:
    """A path the file system can look up: a name or a depth past its limits, a loop of
    symlinks or a file used as a folder is the user's error (a missing path is left to the
    caller, which says what it expected there)."""
    path = Path(path)
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        shown = str(path) if len(str(path)) <= 60 else f"{str(path)[:30]}...{str(path)[-30:]}"
        raise NormexportError(f"{shown}: {e.strerror}", "check the path") from None
    return path
