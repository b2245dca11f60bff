"""Hostile inputs to loading: nothing from a file runs unless the user passes --trust-pickle.

Each payload creates a canary file when it runs. Without the flag every command refuses the
file (exit 2, one ``error:`` line naming the member and one ``hint:`` line naming the flag)
and the canary does not exist; with the flag the same payloads do run (the canary exists),
which shows each test could fail. Special files (FIFO, device, directory) are refused from
their metadata without being opened.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.export import Dim

from cli_helper import invoke
from normexport.load import call_factory, load_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "tinyllama.pt"
COMMANDS = ("convert", "inspect", "validate", "bench", "ln2rms")


# ---------------------------------------------------------------------------------------------
# Payloads: a global that is not a tensor rebuild function, creating the canary when it runs


def canary_value(path: str, value):
    Path(path).touch()
    return value


class Payload:
    def __init__(self, path, value):
        self.path, self.value = str(path), value

    def __reduce__(self):
        return (canary_value, (self.path, self.value))


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# A legitimate archive and hostile rewrites of it


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(16, eps=1e-5)
        self.lin = nn.Linear(16, 16)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))
        self.shift = torch.linspace(-1.0, 1.0, 16)  # a plain tensor attribute: a lifted constant

    def forward(self, x):
        return self.lin(self.norm(x)) * self.scale + self.shift + x.shape[1]


def small_example():
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def legit() -> bytes:
    torch.manual_seed(0)
    ep = torch.export.export(Small().eval(), (small_example(),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},), strict=False)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def rewrite(data: bytes, replace: dict[str, bytes] | None = None, edit_json: dict | None = None) -> bytes:
    """The archive with members replaced or added (names without the top folder) and JSON
    members edited in place."""
    replace, edit_json = dict(replace or {}), edit_json or {}
    src = zipfile.ZipFile(io.BytesIO(data))
    top = src.namelist()[0].split("/", 1)[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            name = info.filename.split("/", 1)[1]
            body = src.read(info)
            if name in edit_json:
                doc = json.loads(body)
                edit_json[name](doc)
                body = json.dumps(doc).encode()
            dst.writestr(f"{top}/{name}", replace.pop(name, body))
        for name, body in replace.items():
            dst.writestr(f"{top}/{name}", body)
    return out.getvalue()


def _member(data: bytes, name: str) -> bytes:
    z = zipfile.ZipFile(io.BytesIO(data))
    return z.read(z.namelist()[0].split("/", 1)[0] + "/" + name)


def _pickled_weight(data, canary):
    def edit(doc):
        meta = doc["config"]["lin.weight"]
        meta["use_pickle"], meta["path_name"] = True, "weight_pickled"

    real = load_model_tensor(data, "weights", "lin.weight")
    return rewrite(data, {"data/weights/weight_pickled": saved(Payload(canary, nn.Parameter(real)))}, {"data/weights/model_weights_config.json": edit})


def _pickled_constant(data, canary):
    config = json.loads(_member(data, "data/constants/model_constants_config.json"))["config"]
    fqn = next(iter(config))

    def edit(doc):
        meta = doc["config"][fqn]
        meta["use_pickle"], meta["path_name"] = True, "tensor_pickled"

    real = load_model_tensor(data, "constants", fqn)
    return rewrite(data, {"data/constants/tensor_pickled": saved(Payload(canary, real))}, {"data/constants/model_constants_config.json": edit})


def load_model_tensor(data: bytes, kind: str, fqn: str) -> torch.Tensor:
    ep = torch.export.load(io.BytesIO(data))  # the legitimate archive: safe to load plainly
    return (ep.state_dict if kind == "weights" else ep.constants)[fqn].detach().clone()


def _sample_inputs(data, canary):
    return rewrite(data, {"data/sample_inputs/model.pt": saved(Payload(canary, ((small_example(),), {})))})


def _object_constant(prefix):
    def build(data, canary):
        import pickle

        def edit(doc):
            doc["config"]["evil"] = {"path_name": prefix + "0", "is_param": False, "use_pickle": True, "tensor_meta": None}

        return rewrite(data, {f"data/constants/{prefix}0": pickle.dumps(Payload(canary, 0))}, {"data/constants/model_constants_config.json": edit})

    return build


def _sympy_expression(data, canary):
    def edit(doc):
        stack = [doc]
        while stack:
            cur = stack.pop()
            if isinstance(cur, dict) and "Symbol(" in str(cur.get("expr_str", "")):
                cur["expr_str"] = f"(__import__('pathlib').Path('{canary}').touch() or {cur['expr_str']})"
                return
            stack.extend(cur.values() if isinstance(cur, dict) else cur if isinstance(cur, list) else [])
        raise AssertionError("no symbolic expression in the archive")

    return rewrite(data, edit_json={"models/model.json": edit})


def _guard(data, canary):
    def edit(doc):
        doc["guards_code"] = [f"__import__('pathlib').Path('{canary}').touch() is None"]

    return rewrite(data, edit_json={"models/model.json": edit})


def _graph_call(data, canary):
    def edit(doc):
        user = doc["graph_module"]["graph"]["inputs"][-1]["as_tensor"]["name"]
        doc["graph_module"]["graph"]["nodes"].insert(0, {
            "target": "torch.save",
            "inputs": [{"name": "", "arg": {"as_tensor": {"name": user}}, "kind": 1}, {"name": "", "arg": {"as_string": str(canary)}, "kind": 1}],
            "outputs": [], "metadata": {}, "is_hop_single_tensor_return": None, "name": "save_canary",
        })

    return rewrite(data, edit_json={"models/model.json": edit})


def _operator_argument(data, canary):
    def edit(doc):
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["inputs"].append({"name": "", "arg": {"as_operator": "torch.serialization.os.system"}, "kind": 1})

    return rewrite(data, edit_json={"models/model.json": edit})


def _aoti_library(data, canary):
    return rewrite(data, {"data/aotinductor/model/model.so": b"\x7fELF not really a library"})


def _appended(data: bytes, name: str, body: bytes) -> bytes:
    import warnings

    out = io.BytesIO(data)
    with warnings.catch_warnings(), zipfile.ZipFile(out, "a", zipfile.ZIP_STORED) as z:
        warnings.simplefilter("ignore")  # a duplicate name is the point of one variant
        z.writestr(name, body)
    return out.getvalue()


def _older_layout_beside(data, canary):
    """Root-level members of the older layout, which torch.export.load reads with zipfile when
    its reader fails; its expressions are parsed with sympy too."""
    program = json.loads(_member(data, "models/model.json"))
    program["guards_code"] = [f"__import__('pathlib').Path('{canary}').touch() is None"]
    ep = torch.export.load(io.BytesIO(data))  # the legitimate archive: safe to load plainly
    older = {"version": b"8.13", "serialized_exported_program.json": json.dumps(program).encode(), "serialized_state_dict.pt": saved(dict(ep.state_dict)),
             "serialized_constants.pt": saved(dict(ep.constants)), "serialized_example_inputs.pt": saved(((small_example(),), {}))}
    for name, body in older.items():
        data = _appended(data, name, body)
    return data


def _duplicate_member(data, canary):
    top = zipfile.ZipFile(io.BytesIO(data)).namelist()[0].split("/", 1)[0]
    program = json.loads(_member(data, "models/model.json"))
    program["guards_code"] = [f"__import__('pathlib').Path('{canary}').touch() is None"]
    return _appended(data, f"{top}/models/model.json", json.dumps(program).encode())


# name -> (builder, words the error must contain, whether the flag makes the file load)
HOSTILE_PT2 = {
    "weight_stored_with_pickle": (_pickled_weight, "data/weights/weight_pickled", True),
    "constant_stored_with_pickle": (_pickled_constant, "data/constants/tensor_pickled", True),
    "sample_inputs": (_sample_inputs, "data/sample_inputs/model.pt", True),
    "opaque_constant": (_object_constant("opaque_obj_"), "data/constants/opaque_obj_0", False),
    "script_object_constant": (_object_constant("custom_obj_"), "data/constants/custom_obj_0", False),
    "symbolic_shape_expression": (_sympy_expression, "models/model.json", True),
    "guard": (_guard, "models/model.json", True),
    "graph_calls_python": (_graph_call, "models/model.json", False),
    "graph_passes_python": (_operator_argument, "torch.serialization.os.system", False),
    "aoti_library": (_aoti_library, "data/aotinductor/model/model.so", False),
    "member_outside_the_folder": (_older_layout_beside, "'version'", False),
    "member_twice": (_duplicate_member, "models/model.json' appears twice", False),
}


# ---------------------------------------------------------------------------------------------
# Running the CLI



def tiny_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 16])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def command_args(command: str, model: Path, tmp: Path) -> list:
    if command in ("validate", "bench"):
        return [command, model, tiny_onnx(tmp / "fused.onnx")]
    if command == "convert":
        return [command, model, "-o", tmp / "out.onnx"]
    if command == "ln2rms":
        return [command, model, "-o", tmp / "out.pt2"]
    return [command, model]


def assert_refused(result, *words):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


def assert_nothing_written(tmp: Path):
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("out") or ".tmp" in p.name or "partial" in p.name]


# ---------------------------------------------------------------------------------------------
# .pt2


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("variant", sorted(HOSTILE_PT2))
def test_hostile_pt2_is_refused_by_every_command_and_runs_nothing(tmp_path, legit, variant, command):
    build, member, _ = HOSTILE_PT2[variant]
    canary = tmp_path / "canary"
    model = tmp_path / "model.pt2"
    model.write_bytes(build(legit, canary))
    result = invoke(*command_args(command, model, tmp_path))
    assert_refused(result, member, "--trust-pickle")
    assert not canary.exists()
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("variant", sorted(k for k, v in HOSTILE_PT2.items() if v[2]))
def test_hostile_pt2_loads_and_runs_its_code_with_trust(tmp_path, legit, variant):
    build = HOSTILE_PT2[variant][0]
    canary = tmp_path / "canary"
    model = tmp_path / "model.pt2"
    model.write_bytes(build(legit, canary))
    loaded = load_model(model, trust_pickle=True)
    assert loaded.kind == "export" and any("--trust-pickle" in n for n in loaded.notes)
    x = small_example()
    with torch.no_grad():
        got = loaded.module(x)
    ref = Small()
    ref.load_state_dict(loaded.exported_program.state_dict, strict=False)
    ref.shift = loaded.exported_program.constants[next(iter(loaded.exported_program.constants))]
    torch.testing.assert_close(got, ref.eval()(x))
    assert canary.exists()  # the payload was live: without the flag its refusal is what kept it from running


@pytest.mark.parametrize("variant", ["opaque_constant"])
def test_object_constant_is_unpickled_only_with_trust(tmp_path, legit, variant):
    canary = tmp_path / "canary"
    model = tmp_path / "model.pt2"
    model.write_bytes(HOSTILE_PT2[variant][0](legit, canary))
    invoke("inspect", model, "--trust-pickle")
    assert canary.exists()


def test_legitimate_archives_load_without_the_flag(tmp_path, legit):
    model = tmp_path / "small.pt2"
    model.write_bytes(legit)
    loaded = load_model(model)
    assert loaded.notes == [] and loaded.input_names == ["x"]
    assert [(s.name, s.dtype, s.shape) for s in loaded.input_specs] == [("x", "float32", (2, 5, 16))]
    x = torch.randn(3, 7, 16)
    ref = Small().eval()
    ref.load_state_dict(loaded.exported_program.state_dict, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), ref(x))
    shipped = load_model(SHIPPED)
    assert shipped.kind == "export" and shipped.notes == [] and shipped.input_specs


def test_inspect_legitimate_archive_without_the_flag(tmp_path, legit):
    model = tmp_path / "small.pt2"
    model.write_bytes(legit)
    result = invoke("inspect", model, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["kind"] == "export"


# ---------------------------------------------------------------------------------------------
# TorchScript: its loader builds TorchScript types only, with or without the flag


@pytest.fixture(scope="module")
def torchscript_archive(tmp_path_factory) -> bytes:
    from normexport.load import save_torchscript

    path = tmp_path_factory.mktemp("ts") / "small.pt"
    save_torchscript(Small().eval(), {"x": small_example()}, path)
    return path.read_bytes()


def _debug_pickle(data: bytes) -> str:
    names = [n.split("/", 1)[1] for n in zipfile.ZipFile(io.BytesIO(data)).namelist()]
    return next(n for n in names if n.endswith(".debug_pkl"))


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("command", ("convert", "inspect", "validate"))
def test_torchscript_pickles_never_run_python(tmp_path, torchscript_archive, command, trust):
    import pickle

    for i, member in enumerate(("data.pkl", "constants.pkl")):
        canary = tmp_path / f"canary{i}"
        model = tmp_path / f"ts{i}.pt"
        model.write_bytes(rewrite(torchscript_archive, {member: pickle.dumps(Payload(canary, 0), protocol=2)}))
        result = invoke(*command_args(command, model, tmp_path), *(["--trust-pickle"] if trust else []))
        assert_refused(result, f"'{member}'", "canary_value", "--trust-pickle does not change that")
        assert not canary.exists()
        assert_nothing_written(tmp_path)


def test_torchscript_debug_pickle_never_runs_python(tmp_path, torchscript_archive):
    import pickle

    canary = tmp_path / "canary"
    model = tmp_path / "ts.pt"
    model.write_bytes(rewrite(torchscript_archive, {_debug_pickle(torchscript_archive): pickle.dumps(Payload(canary, 0), protocol=2)}))
    with torch.no_grad():
        load_model(model, trust_pickle=True).module(small_example())
    assert not canary.exists()


def test_legitimate_torchscript_loads(tmp_path, torchscript_archive):
    model = tmp_path / "small.pt"
    model.write_bytes(torchscript_archive)
    loaded = load_model(model)
    assert loaded.kind == "torchscript" and [s.shape for s in loaded.input_specs] == [(2, 5, 16)]


# ---------------------------------------------------------------------------------------------
# torch.save files: state_dicts and checkpoints load with weights_only=True


def small_factory():
    torch.manual_seed(5)
    return Small().eval(), {"x": small_example()}


def _checkpoint(canary, legacy=False):
    torch.manual_seed(7)
    state = Small().state_dict()
    buf = io.BytesIO()
    torch.save({"state_dict": state, "optimizer": Payload(canary, {})}, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue(), state


def _whole_module(canary):
    torch.manual_seed(7)
    module = Small().eval()
    return saved(Payload(canary, module)), module.state_dict()


HOSTILE_SAVES = {
    "checkpoint_with_an_object": lambda c: _checkpoint(c),
    "legacy_format_checkpoint": lambda c: _checkpoint(c, legacy=True),
    "whole_pickled_module": _whole_module,
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("variant", sorted(HOSTILE_SAVES))
def test_hostile_torch_save_is_refused_by_every_command(tmp_path, variant, command):
    canary = tmp_path / "canary"
    model = tmp_path / "model.pt"
    model.write_bytes(HOSTILE_SAVES[variant](canary)[0])
    result = invoke(*command_args(command, model, tmp_path), "--factory", "test_hostile_load:small_factory", cwd=Path(__file__).parent)
    assert_refused(result, "canary_value", "--trust-pickle")
    assert not canary.exists()
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("variant", sorted(HOSTILE_SAVES))
def test_hostile_torch_save_loads_with_trust(tmp_path, variant):
    canary = tmp_path / "canary"
    model = tmp_path / "model.pt"
    data, state = HOSTILE_SAVES[variant](canary)
    model.write_bytes(data)
    factory = None if variant == "whole_pickled_module" else "test_hostile_load:small_factory"
    loaded = load_model(model, factory=factory, trust_pickle=True)
    assert canary.exists()
    for k, v in loaded.module.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Only regular files are read


@contextmanager
def deadline(seconds: int):
    def fail(*_):
        raise TimeoutError(f"still blocked after {seconds} s: the file was opened")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _special(tmp: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(tmp / "pipe")
        return tmp / "pipe"
    if kind == "directory":
        (tmp / "folder").mkdir()
        return tmp / "folder"
    if kind == "device":
        return Path("/dev/null")  # reads end at once, so a regression fails here instead of hanging
    import socket

    sock = socket.socket(socket.AF_UNIX)
    path = tmp / "sock"
    sock.bind(str(path))
    return path


SPECIAL_WORDS = {"fifo": "is a FIFO", "directory": "is a directory", "socket": "is a socket", "device": "is a device"}


@pytest.mark.parametrize("kind", sorted(SPECIAL_WORDS))
@pytest.mark.parametrize("command", COMMANDS + ("fuse",))
def test_special_file_as_model_exits_2_without_opening_it(tmp_path, command, kind):
    special = _special(tmp_path, kind)
    with deadline(60):
        result = invoke(*command_args(command, special, tmp_path))
    assert_refused(result, SPECIAL_WORDS[kind])
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("command", ("validate", "bench"))
def test_special_file_as_onnx_exits_2_without_opening_it(tmp_path, legit, command):
    model = tmp_path / "small.pt2"
    model.write_bytes(legit)
    fifo = _special(tmp_path, "fifo")
    with deadline(60):
        as_fused = invoke(command, model, fifo)
        as_unfused = invoke(command, model, tiny_onnx(tmp_path / "f.onnx"), "--unfused", fifo)
    assert_refused(as_fused, "is a FIFO")
    assert_refused(as_unfused, "is a FIFO")


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("normexport")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from normexport.cli import main; main()"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("command", ("inspect", "fuse"))
def test_endless_device_exits_2_at_once(tmp_path, command):
    proc = subprocess.run([*_cli(), command, "/dev/zero"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: /dev/zero is a device") and proc.stderr.count("\n") == 2, proc.stderr


# ---------------------------------------------------------------------------------------------
# --factory


FACTORY_SOURCE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(16, eps=1e-5)
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(self.norm(x))


def build():
    torch.manual_seed(0)
    return Tiny().eval(), {"x": torch.randn(2, 5, 16)}
'''


def test_factory_leaves_no_working_folder_on_sys_path(tmp_path):
    """A stray onnxruntime.py in the working folder is not what validation imports later."""
    (tmp_path / "tiny_factory.py").write_text(FACTORY_SOURCE)
    (tmp_path / "onnxruntime.py").write_text(f"open({str(tmp_path / 'canary')!r}, 'w').close()\nraise ImportError('stray module')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import tiny_factory

        torch.save(tiny_factory.build()[0].state_dict(), tmp_path / "tiny.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tiny_factory", None)
    cmd = [*_cli(), "convert", "tiny.pt", "--factory", "tiny_factory:build", "-o", "tiny.onnx", "--no-bench", "--samples", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "canary").exists()
    assert (tmp_path / "tiny.onnx").exists()


def test_call_factory_restores_sys_path(tmp_path, monkeypatch):
    (tmp_path / "restore_factory.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    try:
        module, example = call_factory("restore_factory:build")
    finally:
        sys.modules.pop("restore_factory", None)
    assert sys.path == before
    assert isinstance(module, nn.Module) and set(example) == {"x"}


BROKEN_FACTORIES = {
    "raises": ("def build():\n    raise ValueError('no weights here')\n", "raised ValueError: no weights here"),
    "syntax_error": ("def build(:\n    pass\n", "has a syntax error"),
    "import_fails": ("raise RuntimeError('import-time failure')\n", "raised RuntimeError: import-time failure"),
    "not_a_module": ("def build():\n    return 42\n", "returned int, not an nn.Module"),
    "no_function": ("def other():\n    pass\n", "has no function 'build'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FACTORIES) + ["missing_module"])
def test_broken_factory_exits_2_with_its_cause(tmp_path, case):
    name = f"factory_{case}_{tmp_path.name}".replace("-", "_")
    if case != "missing_module":
        (tmp_path / f"{name}.py").write_text(BROKEN_FACTORIES[case][0])
    torch.save(Small().state_dict(), tmp_path / "state.pt")
    try:
        result = invoke("inspect", tmp_path / "state.pt", "--factory", f"{name}:build", cwd=tmp_path)
    finally:
        sys.modules.pop(name, None)
    assert_refused(result, BROKEN_FACTORIES[case][1] if case in BROKEN_FACTORIES else "cannot import")


# ---------------------------------------------------------------------------------------------
# The text checks behind the .pt2 refusals: what torch writes passes, code does not


def test_symbolic_expressions_torch_writes_pass_and_code_does_not():
    import sympy
    from torch.utils._sympy.functions import CeilToInt, FloorDiv, IntTrueDiv, Max, PythonMod

    from normexport.pt2 import _is_safe_sym_expr

    s0, s1 = sympy.symbols("s0 s1", positive=True, integer=True)
    written = [FloorDiv(s0, 2), Max(1, s0 * s1), PythonMod(s0, 3), CeilToInt(s0 / 3), IntTrueDiv(s0, s1), sympy.Eq(s0, 3),
               sympy.Piecewise((s0, s0 > 2), (1, True)), sympy.oo * s0, s0**2 + 3 * s1 - 1, sympy.Float(0.5) * s0]
    for e in written:
        assert _is_safe_sym_expr(sympy.srepr(e)), sympy.srepr(e)
    assert _is_safe_sym_expr("s0 + 2*s1")
    for code in ["__import__('os').system('x')", "Symbol('a').__class__", "Max(eval('1'))", "S('1+1')", "sympify('1')", "lambdify(s0, s0)",
                 "Symbol('x;y')", "Max('__import__(1)')", "lambda: 1", "Integer(1)[0]", "open('f', 'w')", "Symbol('a')\nimport os"]:
        assert not _is_safe_sym_expr(code), code


def test_guards_torch_writes_pass_and_code_does_not():
    from normexport.pt2 import _is_safe_guard

    for g in ["L['x'].size()[0] == 3", "2 <= L['x'].size()[1]", "(L['x'].size()[0] // 2) <= L['y'].size()[0]",
              "L['x'].size()[0] == (2*L['y'].size()[0])", "math.floor(L['x'].size()[0] / 2) == 3", "torch.sym_max(2, L['x'].size()[0]) <= 10"]:
        assert _is_safe_guard(g), g
    for code in ["__import__('os')", "L['x'].__class__", "torch.save(L['x'], 'f')", "L['x'].size", "L['x; import os'].size()[0]",
                 "getattr(L, 'x')", "(lambda: 1)()", "L['x'].size()[0] == 3 # x", "L['x'].size()[0] == 3\nimport os"]:
        assert not _is_safe_guard(code), code


def test_archive_with_guards_torch_writes_loads_without_the_flag(tmp_path):
    class Halves(nn.Module):
        def forward(self, x, y):
            return x[: x.shape[0] // 2] + y[: x.shape[0] // 2]

    d = Dim("d", min=4, max=64)
    x, y = torch.randn(8, 4), torch.randn(4, 4)
    ep = torch.export.export(Halves(), (x, y), dynamic_shapes=({0: 2 * d}, {0: d}), strict=False)
    torch.export.save(ep, tmp_path / "halves.pt2")
    assert json.loads(_member((tmp_path / "halves.pt2").read_bytes(), "models/model.json"))["guards_code"]
    loaded = load_model(tmp_path / "halves.pt2")
    x, y = torch.randn(12, 4), torch.randn(6, 4)
    torch.testing.assert_close(loaded.module(x, y), x[:6] + y)


def test_loaded_graph_that_calls_python_is_refused(legit):
    from normexport.pt2 import UnsafeMember, check_graph

    ep = torch.export.load(io.BytesIO(legit))  # the legitimate archive: safe to load plainly
    check_graph(ep)
    graph = ep.graph_module.graph
    x = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "x")
    with graph.inserting_after(x):
        graph.call_function(canary_value, ("never-created", x))
    with pytest.raises(UnsafeMember, match="calls .*canary_value, not a torch operator"):
        check_graph(ep)
