"""Where normexport writes, and how.

``check`` runs before any expensive work: no output may be an input (or a file an input
references, such as an ONNX model's external data, or a file of an input folder) or another
output of the same run, however the path is spelled; the folder must exist and take a new
file; an existing file is replaced only when it is of the kind normexport writes there (a
model at ``-o``, one of its own reports at ``--report``, one of its own charts at ``--plot``)
or with ``--force``.

A folder output (a Hugging Face conversion's OUTDIR) is one with every file it will hold and
every file it holds now: none of them may be an input or another output, no input may lie
inside it, no other output may be written into it. An existing folder is replaced only when it
is empty or one normexport wrote (its report and nothing but the files it writes there),
``--force`` or not.

Every file is written to a fresh temp file (``mkstemp``/``mkdtemp`` in the target's folder:
unique, created exclusively, never through a symlink), fsynced and ``os.replace``d into place;
a folder is written whole into a fresh temp folder and renamed into place (``install_folder``).
On any error, Ctrl-C or SIGTERM the temp is removed and an existing file is left as it was;
a full disk is a user error (exit 2), not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from normexport.errors import NormexportError

REPORT_MARKER = "normexport"  # key every JSON report carries (value: the version that wrote it)
PLOT_SOFTWARE = "normexport"  # PNG tEXt "Software" of every chart normexport writes
_TMP_STEM = 40  # temp names keep at most this much of the target's name: any valid name fits
_READ_LIMIT = 64 << 20  # a report or chart larger than this is not one of ours
_ONNX_PARSE_LIMIT = 2 << 30  # protobuf's limit: larger files are not parsed to be recognised
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
CANNOT_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that cleanup runs as for Ctrl-C."""

    exit_code = 128 + signal.SIGTERM


def install_signal_handlers() -> None:
    """SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return

    def _raise(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, _raise)


# ---------------------------------------------------------------------------------------------
# The guard


@dataclass(frozen=True)
class Output:
    """One file a command writes: the option that names it, the path, what it holds
    ("onnx" | "pt2" | "report" | "plot"), or a folder ("folder") with the names of the
    files it may hold (``contents``)."""

    option: str
    path: Path | None
    kind: str
    contents: tuple[str, ...] = ()


KIND_WORDS = {
    "onnx": "an ONNX model",
    "pt2": "a torch.export archive",
    "report": "a normexport JSON report",
    "plot": "a chart normexport wrote",
    "data": "the external data of the ONNX model there",
    "folder": "a folder normexport wrote",
}
_FOLDER_SCAN_LIMIT = 100_000  # entries of an input or output folder looked at by the guard


def check(reads: Iterable[str | os.PathLike | None], writes: Iterable[Output], force: bool = False) -> None:
    """Refuse (NormexportError) any output that would clobber an input, another output, a
    file of another kind (without ``force``), or that cannot be written where it is named."""
    reads = [r for r in reads if r is not None]
    for r in reads:  # a missing input is reported as such, not as a problem with an output beside it
        try:
            os.lstat(r)
        except FileNotFoundError:
            raise NormexportError(f"{_short(str(r))}: no such file", "check the path") from None
        except OSError as e:  # a name too long, a loop of symlinks, a component that is a file
            raise NormexportError(f"{_short(str(r))}: {e.strerror}", "check the path") from None
    writes = [w for w in writes if w.path is not None]
    for out in writes:
        if out.kind == "folder":
            check_folder_place(out.option, Path(out.path), out.contents)
        else:
            check_place(out.option, Path(out.path), [t[1].name for t in _targets(out)])
    check_distinct(reads, writes)
    for out in writes:
        if out.kind == "folder":
            check_folder_replaceable(out.option, Path(out.path), out.contents)
            continue
        for label, target, kind in _targets(out):
            _check_existing(out.option, label, target, kind, force, owner=Path(out.path))


def check_distinct(reads: Iterable[str | os.PathLike | None], writes: Iterable[Output]) -> None:
    """No output is an input, a file an input references or an input folder holds, or another
    output of the run; no input lies inside an output folder, no output is written into one."""
    inputs: list[tuple[str, Path]] = []
    for r in reads:
        if r is None:
            continue
        inputs.append((f"the input {r}", Path(r)))
        if os.path.isdir(r):
            for f in folder_files(Path(r)):
                inputs.append((f"{f}, a file of the input folder {r}", f))
                if f.suffix == ".onnx":
                    inputs += [(f"{d.name}, the external data of {f}", d) for d in external_data_files(f)]
        else:
            inputs += [(f"{d.name}, the external data of the input {r}", d) for d in external_data_files(r)]
    seen: dict[object, str] = {}
    for what, path in inputs:
        for key in _identity(path):
            seen.setdefault(key, what)
    folders: list[tuple[str, Path]] = []  # output folders: replaced whole
    for out in writes:
        if out.path is None:
            continue
        targets = _targets(out)
        for label, target, _ in targets:
            for key in _identity(target):
                what = seen.get(key)
                if what is not None:
                    raise NormexportError(f"{label} is the same file as {what}: refusing to overwrite it", f"give {out.option} another path")
            for flabel, folder in folders:
                if _inside(target, folder):
                    raise NormexportError(f"{label} is inside the output folder {flabel}, which is written whole: refusing to write into it", f"give {out.option} a path outside it")
        if out.kind == "folder":
            folder = Path(out.path)
            for key, what in seen.items():  # the inputs and the outputs before this one
                if isinstance(key, str) and _inside(Path(key), folder):
                    raise NormexportError(f"{what} is inside the output folder {out.option} {folder}, which is replaced whole: refusing to remove it", f"give {out.option} another path")
            folders.append((f"{out.option} {folder}", folder))
        for label, target, _ in targets:
            for key in _identity(target):
                seen.setdefault(key, label)


def folder_files(folder: Path) -> list[Path]:
    """The files (after symlinks) directly in ``folder``: what a Hugging Face folder is read
    from, and what an output folder holds."""
    found = []
    try:
        with os.scandir(folder) as it:
            for i, entry in enumerate(it):
                if i >= _FOLDER_SCAN_LIMIT:
                    raise NormexportError(f"{_short(str(folder))} holds more than {_FOLDER_SCAN_LIMIT} entries", "give a folder that holds the model's files only")
                with contextlib.suppress(OSError):
                    if entry.is_file() or entry.is_symlink():
                        found.append(Path(folder) / entry.name)
    except OSError as e:
        raise NormexportError(f"{_short(str(folder))}: cannot list it ({e.strerror})", "check the folder and its permissions") from None
    return found


def _identity(path: Path) -> list[object]:
    """What makes two spellings one file: the real path, the entry itself (its real folder and
    name: a symlink there is what is replaced), and the inode where it exists."""
    path = Path(path)
    keys: list[object] = [os.path.realpath(path)]
    with contextlib.suppress(OSError, ValueError):
        keys.append(os.path.join(os.path.realpath(path.parent), path.name) if path.name not in ("", ".", "..") else os.path.realpath(path))
    with contextlib.suppress(OSError, ValueError):
        st = os.stat(path)
        keys.append((st.st_dev, st.st_ino))
    return keys


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies under it, however either is spelled."""
    path = Path(path)
    inner = {k for k in _identity(path) if isinstance(k, str)}
    outer = {k for k in _identity(folder) if isinstance(k, str)}
    return any(i == o or i.startswith(o.rstrip(os.sep) + os.sep) for i in inner for o in outer)


def _targets(out: Output) -> list[tuple[str, Path, str]]:
    path = Path(out.path)
    targets = [(f"{out.option} {path}", path, out.kind)]
    if out.kind == "onnx":  # a model over ~2 GB writes its weights beside it
        targets.append((f"the external data {data_path(path).name} that {out.option} {path} may write", data_path(path), "data"))
    if out.kind == "folder":  # the files it will hold, and those it holds now (replaced with it)
        names = dict.fromkeys(out.contents)
        if path.is_dir() and not path.is_symlink():
            names.update(dict.fromkeys(f.name for f in folder_files(path)))
        targets += [(f"{path / n} (in {out.option} {path})", path / n, "folder-file") for n in names]
    return targets


def check_place(option: str, path: Path, names: list[str]) -> None:
    """The folder exists, is a folder, takes a new file; the name(s) fit the file system."""
    parent = path.parent  # not normalised: "missing/../x" fails in the file system too
    shown = _short(str(path))
    try:
        if not parent.exists():
            raise NormexportError(f"{option} {shown}: the folder {_short(str(path.parent))} does not exist", "create it first, or write elsewhere")
        if not parent.is_dir():
            raise NormexportError(f"{option} {shown}: {_short(str(path.parent))} is not a folder", "give a path inside a folder")
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except OSError as e:  # a folder name too long, a loop of symlinks
        raise NormexportError(f"{option} {shown}: {e.strerror}", f"give {option} another path") from None
    for name in names:
        if len(os.fsencode(name)) > name_max:
            also = "" if name == path.name else f" (a model over 2 GB also writes {_short(name)} beside it)"
            raise NormexportError(f"{option} {shown}: the file name is longer than this file system allows ({name_max} bytes){also}", "give a shorter name")
    if path.is_dir():
        raise NormexportError(f"{option} {shown} is a folder", f"give a file path, e.g. {option} {_short(str(path / 'out'))}")
    if path.exists() and not path.is_file():
        raise NormexportError(f"{option} {shown} exists and is not a regular file", f"give {option} a file path")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=_tmp_prefix(path), suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise NormexportError(f"{option} {path}: cannot write in {path.parent} ({e.strerror})", f"give {option} a path in a folder you can write") from None


def check_folder_place(option: str, path: Path, contents: Iterable[str] = ()) -> None:
    """The folder a folder output goes in exists and takes a new folder; the names fit."""
    shown = _short(str(path))
    if path.name in ("", ".", ".."):
        raise NormexportError(f"{option} {shown} names no new folder", f"give {option} a folder path such as out-onnx")
    try:
        parent = path.parent
        if not parent.exists():
            raise NormexportError(f"{option} {shown}: the folder {_short(str(parent))} does not exist", "create it first, or write elsewhere")
        if not parent.is_dir():
            raise NormexportError(f"{option} {shown}: {_short(str(parent))} is not a folder", "give a path inside a folder")
        name_max = os.pathconf(parent, "PC_NAME_MAX")
        path_max = os.pathconf(parent, "PC_PATH_MAX")
    except OSError as e:
        raise NormexportError(f"{option} {shown}: {e.strerror}", f"give {option} another path") from None
    for name in (path.name, *contents):
        if len(os.fsencode(name)) > name_max:
            raise NormexportError(f"{option} {shown}: the name is longer than this file system allows ({name_max} bytes)", "give a shorter name")
    longest = max((len(os.fsencode(str(path / n))) for n in contents), default=len(os.fsencode(str(path))))
    if longest >= path_max:
        raise NormexportError(f"{option} {shown}: its files' paths would be longer than this file system allows ({path_max} bytes)", "give a shorter path")
    try:
        probe = tempfile.mkdtemp(dir=parent, prefix=_tmp_prefix(path), suffix=".tmp")
        os.rmdir(probe)
    except OSError as e:
        raise NormexportError(f"{option} {shown}: cannot write in {_short(str(parent))} ({e.strerror})", f"give {option} a path in a folder you can write") from None


def check_folder_replaceable(option: str, path: Path, contents: Iterable[str] = ()) -> None:
    """An existing entry at a folder output: a symlink (dangling, or to a folder that may be
    replaced) is replaced itself; an empty folder or one normexport wrote is replaced; anything
    else is refused, ``--force`` or not (normexport deletes no folder it did not write)."""
    shown = _short(str(path))
    try:
        if not os.path.lexists(path) or (os.path.islink(path) and not os.path.exists(path)):
            return
        if not os.path.isdir(path):
            raise NormexportError(f"{option} {shown} exists and is not a folder", f"give {option} a folder path (the folder is created)")
        if replaceable_folder(path, contents):
            return
    except OSError as e:
        raise NormexportError(f"{option} {shown}: {e.strerror}", f"give {option} another path") from None
    raise NormexportError(
        f"{option} {shown} already exists and is not a folder normexport wrote: refusing to replace it",
        f"remove it or give another {option} folder (normexport deletes no folder it did not write, --force or not)",
    )


def replaceable_folder(path: Path, contents: Iterable[str]) -> bool:
    """Empty, or one normexport wrote: every entry a regular file named as it writes them,
    one of them its own JSON report."""
    allowed = set(contents)
    entries = os.listdir(path)
    if not entries:
        return True
    if len(entries) > len(allowed) or any(e not in allowed for e in entries):
        return False
    if not all(stat.S_ISREG(os.lstat(os.path.join(path, e)).st_mode) for e in entries):
        return False
    return any(e.endswith(".json") and is_own(Path(path) / e, "report") for e in entries)


def _check_existing(option: str, label: str, path: Path, kind: str, force: bool, owner: Path) -> None:
    if not os.path.lexists(path):
        return
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise NormexportError(f"{label} exists and is not a regular file", f"give {option} another path")
    if force or is_own(path, kind, owner):
        return
    raise NormexportError(
        f"{label} exists and is not {KIND_WORDS[kind]}: refusing to overwrite it",
        f"give {option} another path, or pass --force to replace it",
    )


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """One file however spelled: the same real path, or the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def data_path(model_path: Path) -> Path:
    """Where ``save_onnx`` puts a large model's weights."""
    return model_path.with_name(f"{model_path.name}.data")


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files an ONNX model references (read without loading the data);
    [] for anything that is not a readable ONNX model."""
    proto = _read_onnx_header(Path(path))
    if proto is None:
        return []
    base = Path(path).parent
    return [base / loc for loc in sorted(_external_locations(proto))]


def _read_onnx_header(path: Path):
    try:
        if not path.is_file() or path.stat().st_size > _ONNX_PARSE_LIMIT:
            return None
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or head[:4] == b"\x89PNG":
            return None  # a PyTorch archive or pickle, a chart
        import onnx

        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:
        return None
    if proto.ir_version <= 0 or not proto.opset_import or not proto.graph.node:
        return None  # random bytes can parse as an (empty) protobuf message
    return proto


def _external_locations(proto) -> set[str]:
    from onnx import TensorProto

    locs: set[str] = set()

    def tensors(t):
        if t.data_location == TensorProto.EXTERNAL:
            locs.update(e.value for e in t.external_data if e.key == "location")

    def graph(g):
        for t in g.initializer:
            tensors(t)
        for s in g.sparse_initializer:
            tensors(s.values)
            tensors(s.indices)
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    tensors(a.t)
                for t in a.tensors:
                    tensors(t)
                if a.HasField("g"):
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)

    graph(proto.graph)
    for fn in proto.functions:
        for n in fn.node:
            for a in n.attribute:
                if a.HasField("t"):
                    tensors(a.t)
    return locs


def is_own(path: Path, kind: str, owner: Path | None = None) -> bool:
    """Whether the existing file at ``path`` is of the kind normexport writes there."""
    try:
        if kind == "onnx":
            return _read_onnx_header(path) is not None
        if kind == "data":  # the weights of the model already at the output: replaced with it
            return owner is not None and any(same_file(path, d) for d in external_data_files(owner))
        if kind == "pt2":
            import zipfile

            with zipfile.ZipFile(path) as z:
                return any(n == "archive_format" or n.endswith("/archive_format") for n in z.namelist())
        if os.path.getsize(path) > _READ_LIMIT:
            return False
        data = Path(path).read_bytes()
        if kind == "report":
            obj = json.loads(data)
            return isinstance(obj, dict) and isinstance(obj.get(REPORT_MARKER), str)
        if kind == "plot":
            return png_software(data).startswith(PLOT_SOFTWARE)
    except Exception:
        return False
    return False


def png_software(data: bytes) -> str:
    """The "Software" tEXt of a PNG ("" if none or not a PNG)."""
    import struct

    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return ""
    i = 8
    while i + 8 <= len(data):
        n, ctype = struct.unpack(">I4s", data[i : i + 8])
        if ctype == b"tEXt":
            key, _, text = data[i + 8 : i + 8 + n].partition(b"\x00")
            if key == b"Software":
                return text.decode("latin-1")
        if ctype in (b"IDAT", b"IEND"):
            break
        i += 12 + n
    return ""


# ---------------------------------------------------------------------------------------------
# Atomic writes


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with replacing(Path(path)) as tmp:
        with open(tmp, "r+b") as f:
            f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the file at a temp path beside ``path``; it then replaces ``path``."""
    with replacing(Path(path)) as tmp:
        write(tmp)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with replacing(Path(dst)) as tmp:
        with open(src, "rb") as fi, open(tmp, "r+b") as fo:
            shutil.copyfileobj(fi, fo, 16 << 20)


def install_onnx(src: Path, dst: Path) -> None:
    """Copy an ONNX model written elsewhere into place, with its external data file (named
    after the model, so ``src.name`` must be ``dst.name`` when there is one): data first."""
    src, dst = Path(src), Path(dst)
    if not data_path(src).exists():
        copy_file(src, dst)
        return
    if src.name != dst.name:
        raise ValueError(f"{src} references its data by its own name; it cannot be installed as {dst.name}")
    with staged(data_path(dst), dst) as d:
        for s, t in ((data_path(src), data_path(dst)), (src, dst)):
            shutil.copyfile(s, d / t.name)


def install_folder(staged: Path, out: Path, contents: Iterable[str]) -> None:
    """Rename the folder ``staged`` (written whole, in ``out``'s folder) into place at ``out``.

    Its files are fsynced first. ``out`` absent: one rename. ``out`` present (a symlink, an
    empty folder or one normexport wrote, checked again now under the folder's lock): the two
    are exchanged in one atomic step where the system can (``renameat2`` RENAME_EXCHANGE),
    else the old one is renamed aside first; the old one ends at ``staged`` for the caller to
    remove. Concurrent runs publish one after the other: the last rename wins. Something else
    that appeared at ``out`` during the run is a NormexportError; nothing is half written."""
    staged, out = Path(staged), Path(out)
    umask = _umask()
    for f in staged.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(f, 0o666 & ~umask)
    os.chmod(staged, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the usual mode
    _fsync_dir(staged)
    parent = out.parent
    with _cleaned(parent), _signals_blocked(), _dir_locked(parent):
        for _ in range(3):
            if not os.path.lexists(out):
                try:
                    os.rename(staged, out)
                    break
                except OSError as e:  # appeared between the look and the rename (a run without the lock)
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                        raise
                    continue
            check_folder_replaceable("-o", out, contents)
            if _exchange(staged, out):
                break
            aside = Path(tempfile.mkdtemp(dir=parent, prefix=_tmp_prefix(out), suffix=".old"))
            os.rename(out, aside / "old")
            os.rename(staged, out)
            os.rename(aside / "old", staged)
            os.rmdir(aside)
            break
        else:
            raise NormexportError(f"-o {_short(str(out))} keeps changing while normexport writes it", "give another -o folder, or run one conversion at a time there")
    _fsync_dir(parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two entries of one file system atomically (Linux renameat2 RENAME_EXCHANGE);
    False where the system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A fresh empty temp file (mkstemp: exclusive, mode 0600) beside ``path``; on leaving the
    block without an exception it is fsynced, given the usual mode and renamed over ``path``;
    otherwise removed."""
    path = Path(path)
    with _cleaned(path.parent) as temps:
        with _signals_blocked():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
            temps.append(Path(tmp))
        os.close(fd)
        yield Path(tmp)
        _publish([(Path(tmp), path)], temps)


@contextlib.contextmanager
def staged(*targets: Path) -> Iterator[Path]:
    """A fresh private folder (mkdtemp) beside the targets, which share one folder: write each
    target as ``folder / target.name``; on success the files are fsynced and renamed into place
    in the order given (an ONNX model's external data before the model); otherwise removed."""
    targets = tuple(Path(t) for t in targets)
    parent = targets[0].parent
    with _cleaned(parent) as temps:
        with _signals_blocked():
            d = Path(tempfile.mkdtemp(dir=parent, prefix=_tmp_prefix(targets[0]), suffix=".tmp"))
            temps.append(d)
        yield d
        _publish([(d / t.name, t) for t in targets], temps)


def _publish(pairs: list[tuple[Path, Path]], temps: list[Path]) -> None:
    umask = _umask()
    for tmp, _ in pairs:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
    parent = pairs[0][1].parent
    with _signals_blocked(), _dir_locked(parent):
        for tmp, dst in pairs:
            os.replace(tmp, dst)
        temps[:] = [t for t in temps if t.is_dir()]  # a staging folder is still to be removed
    _fsync_dir(parent)


@contextlib.contextmanager
def _cleaned(folder: Path) -> Iterator[list[Path]]:
    """Remove the listed temps on any exception; a full disk, or an output folder that went
    away or became read-only during the run, becomes a NormexportError."""
    temps: list[Path] = []
    try:
        yield temps
    except OSError as e:
        where = _short(str(folder))
        _remove(temps)
        if e.errno in NO_SPACE:
            raise NormexportError(f"no space left to write the output in {where} ({e.strerror})", "free space there (or raise the file-size limit), or write elsewhere") from None
        if e.errno in CANNOT_WRITE or (e.errno in (errno.ENOENT, errno.ENOTDIR) and not folder.is_dir()):
            raise NormexportError(f"cannot write the output in {where} ({e.strerror})", "check the output folder, or write elsewhere") from None
        raise
    except BaseException:
        _remove(temps)
        raise
    _remove(temps)


def _remove(temps: list[Path]) -> None:
    with _signals_blocked():
        for t in temps:
            if t.is_dir() and not t.is_symlink():
                shutil.rmtree(t, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):  # best effort: already gone, or the folder turned read-only
                    os.unlink(t)
        temps.clear()


def _short(text: str, keep: int = 60) -> str:
    return text if len(text) <= keep else f"{text[: keep // 2]}...{text[-keep // 2 :]}"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name[:_TMP_STEM]}."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT/SIGTERM held back (delivered right after) while temps are created, renamed or
    removed, so that an interrupt cannot fall between a temp's creation and its bookkeeping."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _dir_locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder: concurrent runs rename their file pairs one after the
    other (a model and its external data always come from the same run)."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def work_dir(prefix: str = "normexport-") -> Iterator[Path]:
    """A private temp folder (in TMPDIR), removed on leaving, whatever happens."""
    with _signals_blocked():
        d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        with _signals_blocked():
            shutil.rmtree(d, ignore_errors=True)
