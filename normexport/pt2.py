"""Load a torch.export archive (.pt2) without running code from it.

``torch.export.load`` runs code from an archive in several ways: it unpickles weights and
constants stored with pickle and the sample inputs (falling back to an unrestricted unpickler
when the safe one refuses), unpickles opaque and script-object constants, loads compiled
AOTInductor libraries, parses each symbolic shape with ``sympy.sympify`` (which evaluates its
text as Python), compiles the archive's guards into Python, and resolves each graph node's
target to any callable reachable from ``torch``. Unless the user trusts the file:

- every ``torch.load`` torch makes while loading is forced to ``weights_only=True`` (through
  torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch, and by wrapping ``torch.load`` so that a
  refusal names the member);
- members other than models, weights, tensor constants, sample inputs and extra text files are
  refused by name before torch reads anything;
- every symbolic expression and guard must be arithmetic on symbols and input sizes;
- every graph node must call a torch operator (checked in the archive and in the loaded graph).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import keyword
import logging
import operator
import re
from dataclasses import dataclass

from normexport.logs import quiet_loggers, scoped_environ

TRUST_HINT = "loading it could run code from the file; only if you trust the file, pass --trust-pickle"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_EXPR = 10_000


@dataclass
class UnsafeMember(Exception):
    """An archive member that loading would have to run code for: its name and why."""

    member: str
    reason: str

    def __str__(self) -> str:
        return f"archive member '{self.member}' {self.reason}"


def load_exported(data: bytes, trusted: bool = False):
    """``torch.export.load`` of the archive ``data``; unless ``trusted``, with the guards
    above (raises UnsafeMember naming what would run code)."""
    import zipfile

    import torch

    from normexport.paths import check_member_sizes

    with zipfile.ZipFile(io.BytesIO(data)) as z:  # declared sizes, before torch inflates anything
        check_member_sizes("the archive", z.infolist())
    if trusted:
        with _quiet_torch_export_log():
            return torch.export.load(io.BytesIO(data))
    check_members(data)
    with _weights_only_loads(data), _quiet_torch_export_log():
        ep = torch.export.load(io.BytesIO(data))
    check_graph(ep)
    return ep


# ---------------------------------------------------------------------------------------------
# Before torch reads the archive: members, constants, symbolic expressions, guards


def check_members(data: bytes) -> None:
    """Refuse members torch would execute or unpickle beyond tensors, reading them with torch's
    own archive reader (the bytes checked are the bytes torch loads)."""
    from torch.export.pt2_archive import PT2ArchiveReader
    from torch.export.pt2_archive import constants as c

    _check_zip_layout(data)
    reader = PT2ArchiveReader(io.BytesIO(data))
    names = reader.get_file_names()
    fixed = {c.ARCHIVE_FORMAT_PATH, c.ARCHIVE_VERSION_PATH, "byteorder"}
    data_dirs = (c.WEIGHTS_DIR, c.CONSTANTS_DIR, c.SAMPLE_INPUTS_DIR, c.EXTRA_DIR, ".data/")
    for name in names:
        if name in fixed or name.startswith(data_dirs) or (name.startswith(c.MODELS_DIR) and name.endswith(".json")):
            continue
        kind = "compiled code (AOTInductor)" if name.startswith(c.AOTINDUCTOR_DIR) else "content torch.export.load would run or unpickle"
        raise UnsafeMember(name, f"holds {kind}")
    for name in names:
        if name.startswith(c.MODELS_DIR) and name.endswith(".json"):
            check_program_json(name, reader.read_bytes(name))
        elif name.startswith(c.CONSTANTS_DIR) and name.endswith("_constants_config.json"):
            _check_constants_config(name, reader.read_bytes(name), c)


def _check_zip_layout(data: bytes) -> None:
    """One top folder, each name once: what torch's reader and torch.export.load's fallback to
    the older layout (read with Python's zipfile) see is then the same set of members."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or any("/" not in n for n in names):
        loose = next((n for n in names if "/" not in n), sorted(tops)[-1])
        raise UnsafeMember(loose, "lies outside the archive's one top folder (torch.export.load would read it as an older layout)")
    if len(names) != len(set(names)):
        dup = next(n for n in names if names.count(n) > 1)
        raise UnsafeMember(dup, "appears twice (which copy is loaded depends on the reader)")


def _check_constants_config(name: str, raw: bytes, c) -> None:
    try:
        config = json.loads(raw).get("config", {})
    except (ValueError, AttributeError):
        raise UnsafeMember(name, "is not a readable constants table") from None
    for fqn, meta in config.items():
        path = str((meta or {}).get("path_name", ""))
        if not path.startswith(c.TENSOR_CONSTANT_FILENAME_PREFIX):
            what = "an opaque Python object" if path.startswith(c.OPAQUE_OBJ_FILENAME_PREFIX) else "a script object" if path.startswith(c.CUSTOM_OBJ_FILENAME_PREFIX) else "a non-tensor object"
            raise UnsafeMember(c.CONSTANTS_DIR + path, f"(constant '{fqn}') is {what}, which loading unpickles")


def check_program_json(name: str, raw: bytes) -> None:
    """Every ``expr_str`` (parsed by sympy.sympify) and guard (compiled by ep.module()) must be
    plain arithmetic."""
    try:
        program = json.loads(raw)
    except ValueError:
        raise UnsafeMember(name, "is not readable JSON") from None
    for text in _strings_under(program, "expr_str"):
        if not _is_safe_sym_expr(text):
            raise UnsafeMember(name, f"has a symbolic expression that is not arithmetic ({text[:80]!r}); sympy would evaluate it as Python")
    for target in _node_targets(program):
        if not _OPERATOR_TARGET.match(target):
            raise UnsafeMember(name, f"has a graph node that calls {target[:80]!r}, not a torch operator")
    guards = program.get("guards_code") if isinstance(program, dict) else None
    for text in guards or []:
        if not (isinstance(text, str) and _is_safe_guard(text)):
            raise UnsafeMember(name, f"has a guard that is not a size check ({str(text)[:80]!r}); torch would compile it as Python")


# What torch.export.save writes for a node's target: an operator overload, a higher-order
# operator, a symbolic-int operation, or a registered extension operator ("#namespace:name").
_OPERATOR_TARGET = re.compile(r"(torch\.ops\.[\w.]+|_operator\.\w+|math\.\w+|torch\.sym_\w+|#[\w.]+:[\w.]+)\Z")


def _node_targets(obj):
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            if "target" in cur and "inputs" in cur:
                yield cur["target"] if isinstance(cur["target"], str) else repr(cur["target"])
            if "as_operator" in cur:  # an operator passed as an argument (to a higher-order op)
                yield cur["as_operator"] if isinstance(cur["as_operator"], str) else repr(cur["as_operator"])
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)


def _strings_under(obj, key: str):
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for k, v in cur.items():
                if k == key:
                    yield v if isinstance(v, str) else repr(v)
                else:
                    stack.append(v)
        elif isinstance(cur, list):
            stack.extend(cur)


_ARITH_NODES = (ast.Expression, ast.Tuple, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.Load, ast.keyword)


def _plain_text(text: str) -> bool:
    return len(text) <= _MAX_EXPR and not any(ch in text for ch in "#\\\n\r;")


def _expression(text: str) -> ast.AST | None:
    """``text`` parsed as one Python expression, or None where it is not plain, short text
    that parses (what torch would evaluate is only ever checked as this tree, never run)."""
    if not _plain_text(text):
        return None
    try:
        return ast.parse(text, mode="eval")
    except SyntaxError:
        return None


def _is_safe_sym_expr(text: str) -> bool:
    """sympy's ``srepr`` form (``Mul(Integer(8), Symbol('s27', positive=True))``) or infix:
    calls only to sympy expression classes, strings only as identifiers."""
    tree = _expression(text)
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and _is_sympy_class(node.func.id)):
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not (_IDENT.match(node.value) or _NUMBER.match(node.value)):
                return False
            if not isinstance(node.value, (str, int, float, bool)) or node.value is None:
                return False
        elif isinstance(node, ast.Name):
            if node.id.startswith("_") or keyword.iskeyword(node.id):
                return False
        elif not isinstance(node, _ARITH_NODES):
            return False
    return True


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")


def _is_sympy_class(name: str) -> bool:
    """A name sympify would call: a sympy expression class builds an expression, and a name it
    does not know becomes an undefined function; anything else (a builtin, ``sympify``,
    ``lambdify``, ``S``...) is refused."""
    import builtins

    import sympy
    import torch.utils._sympy.functions as torch_sympy

    if name.startswith("_"):
        return False
    obj = getattr(torch_sympy, name, None) or getattr(sympy, name, None)
    if obj is None:
        return not hasattr(builtins, name)
    return isinstance(obj, type) and issubclass(obj, sympy.Basic)


_SIZE_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_MATH_FUNCS = {"floor", "ceil", "trunc", "isnan", "isinf", "isfinite", "sqrt", "log2"}
_GUARD_NAMES = {"L", "inf", "math", "torch"}


def _is_safe_guard(text: str) -> bool:
    """Guards as torch writes them: ``L['x'].size()[0] == 3``, ``2 <= L['x'].size()[1]``."""
    tree = _expression(text)
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if node.keywords or not isinstance(f, ast.Attribute):
                return False
            base = f.value
            if isinstance(base, ast.Name) and base.id == "math":
                ok = f.attr in _MATH_FUNCS
            elif isinstance(base, ast.Name) and base.id == "torch":
                ok = f.attr.startswith("sym_") and _IDENT.match(f.attr)
            else:
                ok = f.attr in _SIZE_METHODS
            if not ok:
                return False
        elif isinstance(node, ast.Attribute):
            continue  # checked as a call's function above; a bare attribute is refused below
        elif isinstance(node, ast.Subscript):
            continue
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not _IDENT.match(node.value):
                return False
            if not isinstance(node.value, (str, int, float, bool)):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in _GUARD_NAMES:
                return False
        elif not isinstance(node, _ARITH_NODES):
            return False
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return all(id(n) in called for n in ast.walk(tree) if isinstance(n, ast.Attribute))


# ---------------------------------------------------------------------------------------------
# While torch reads it: every torch.load is weights_only, and a refusal names the member


@contextlib.contextmanager
def _weights_only_loads(data: bytes):
    """For the duration of one load, in this process: ``torch.load`` forced to weights-only
    (torch's switch, and a wrapper that names the member). Not for concurrent loads in threads."""
    import pickle

    import torch

    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise UnsafeMember(_member_holding(data, f), f"needs unpickling beyond tensors ({unpickling_reason(e)})") from None

    with scoped_environ({"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": None}):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def _member_holding(data: bytes, f) -> str:
    """The archive member whose bytes torch was unpickling."""
    import zipfile

    payload = f.getvalue() if isinstance(f, io.BytesIO) else None
    if payload is not None:
        with contextlib.suppress(Exception), zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                if info.file_size == len(payload) and z.read(info) == payload:
                    return info.filename.split("/", 1)[-1]
    return "(unknown member)"


def unpickling_reason(e: Exception) -> str:
    """Why torch's weights-only unpickler refused: the global it met, or its own words."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it references {m.group(1)}"
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:", 1)[-1].strip()[:200]
    return "it holds objects other than tensors"


def _quiet_torch_export_log():
    """torch.export.load logs tracebacks on its fallbacks (and one of those log calls has a
    broken format string); the refusal or the error says it all."""
    return quiet_loggers(("torch.export", "torch._export"), logging.CRITICAL)


# ---------------------------------------------------------------------------------------------
# After: the graph calls operators only


def check_graph(ep) -> None:
    """Every call in the loaded graph (and its subgraphs) is a torch operator or a symbolic
    int operation; no node passes a Python callable as an argument."""
    import torch
    from torch.fx.node import map_aggregate

    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op not in ("placeholder", "output", "get_attr", "call_function"):
                raise UnsafeMember("models/model.json", f"has a graph node '{node.name}' of kind {node.op}")
            if node.op == "call_function" and not _is_operator(node.target):
                raise UnsafeMember("models/model.json", f"has a graph node '{node.name}' that calls {_describe(node.target)}, not a torch operator")
            bad = []
            map_aggregate((node.args, node.kwargs), lambda a: bad.append(a) if callable(a) and not _is_operator(a) and not isinstance(a, torch.fx.Node) else None)
            if bad:
                raise UnsafeMember("models/model.json", f"has a graph node '{node.name}' that passes {_describe(bad[0])}, not a torch operator")


def _is_operator(target) -> bool:
    import torch

    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return True
    return target is operator.getitem or target in _sym_ops()


def _sym_ops() -> set:
    try:
        from torch._export.serde.serialize import _SYM_OPS

        return set(_SYM_OPS)
    except ImportError:  # pragma: no cover - other torch versions
        import math

        import torch

        return {operator.eq, operator.ne, operator.le, operator.ge, operator.lt, operator.gt, operator.neg, operator.pos, operator.mul,
                operator.add, operator.sub, operator.floordiv, operator.mod, operator.pow, operator.truediv, operator.and_, operator.or_,
                math.trunc, torch.sym_not, torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max, torch.sym_min, torch.sym_sqrt}


def _describe(target) -> str:
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__name__
    return f"{mod}.{name}" if mod else str(name)
