"""The gates inputs pass before they are opened or inflated: a usable path, a regular file
(models, ONNX files, factories), an archive whose members fit (zip bombs, memory)."""

from __future__ import annotations

import os
import stat
import zipfile
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


MAX_INFLATION = 100  # deflate's best is ~1000:1; weights and pickles compress far less
SMALL_MEMBER = 64 << 20


def check_member_sizes(path: Path, infos: list, memory: int | None = None) -> None:
    """Before any member is inflated: a compressed member must not inflate past MAX_INFLATION
    times its stored size (unless small), and all members together must fit in the memory
    available (what torch's readers allocate, by the sizes the archive declares)."""
    from normexport.hf.config_checks import available_memory

    total = 0
    for info in infos:
        total += info.file_size
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > SMALL_MEMBER and info.file_size > MAX_INFLATION * max(info.compress_size, 1):
            raise NormexportError(
                f"{path}: archive member {info.filename} declares {info.file_size} bytes from {info.compress_size} stored "
                f"(x{info.file_size // max(info.compress_size, 1)}); not inflated",
                "PyTorch writes its archives uncompressed: save the model again with torch.save / torch.export.save",
            )
    memory = available_memory() if memory is None else memory
    if memory is not None and total > memory:
        raise NormexportError(
            f"{path}: the archive's members declare {total} bytes in all, more than the {memory} bytes of memory available; not read",
            "load it on a machine with more memory, or check the file (a truncated or hostile archive)",
        )
