"""The newer surfaces under hostile use: folder outputs and the guard, factories, the Python
API's option checks, markup in paths, odd metadata and paths. Each ends in exit 2 (or a
correct result) with the user's files intact; none in exit 3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ort_helper
import own_model
import rms_graphs
from cli_helper import invoke, snapshot
from normexport import outputs
from normexport.errors import NormexportError
from normexport.hf.convert import OUTPUT_FILES, REPORT_NAME, output_folder
from normexport.report import write_json

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from normexport.cli import main; main()"]




def assert_exit2(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def fake_hf_folder(folder: Path) -> Path:
    """What the guard sees of a Hugging Face folder (nothing here is loaded: refusals come first)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(os.urandom(256))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def own_folder(folder: Path, tag: str = "old") -> Path:
    """A folder as `convert DIR` writes it: its marked report and files of its names only."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(tag.encode() * 10)
    write_json({"model": tag}, folder / REPORT_NAME)
    return folder


@pytest.fixture
def no_hf_load(monkeypatch):
    """Refusals come before transformers builds anything."""
    import normexport.hf.folder as folder

    def loaded(*a, **k):
        raise AssertionError("the folder was loaded before the outputs were checked")

    monkeypatch.setattr(folder, "load_folder", loaded)


# ---------------------------------------------------------------------------------------------
# Folder outputs and the guard: the command line


def test_report_at_the_output_folder_is_refused_before_any_export(tmp_path, no_hf_load):
    src = fake_hf_folder(tmp_path / "m")
    before = snapshot(tmp_path)
    for report in ("X", "X/model.onnx", f"X/{REPORT_NAME}", "X/other.json", "X/../X"):
        assert_exit2(invoke("convert", src, "-o", tmp_path / "X", "--report", tmp_path / report), "--report")
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_report_over_an_input_folder_file_is_refused(tmp_path, no_hf_load, force):
    src = fake_hf_folder(tmp_path / "m")
    out = own_folder(tmp_path / "out")
    os.link(src / "tokenizer.json", tmp_path / "hard.json")
    os.symlink(src / "config.json", tmp_path / "soft.json")
    before = snapshot(tmp_path)
    for report in (src / "config.json", tmp_path / "m" / ".." / "m" / "model.safetensors", tmp_path / "hard.json", tmp_path / "soft.json"):
        assert_exit2(invoke("convert", src, "-o", tmp_path / "new", "--report", report, *force), "input folder")
        assert_exit2(invoke("validate", src, out, "--report", report, *force), "input folder")
    # the folder under test is an input of validate and bench: its model is not replaced by a report
    for report in (out / "model.onnx", out / REPORT_NAME):
        assert_exit2(invoke("validate", src, out, "--report", report, *force), "input folder")
        assert_exit2(invoke("bench", src, out, "--report", report, *force), "input folder")
    assert_exit2(invoke("bench", src, out, "--plot", out / "model.onnx", *force), "input folder")
    assert snapshot(tmp_path) == before


def test_output_folder_that_holds_or_is_an_input_is_refused(tmp_path, no_hf_load):
    src = fake_hf_folder(tmp_path / "work" / "m")
    os.symlink(src, tmp_path / "link")
    before = snapshot(tmp_path)
    for out, words in (
        (src, "the input"), (tmp_path / "link", "the input"), (tmp_path / "work", "inside the output folder"),
        (src / "config.json", "the input folder"), (tmp_path / "work" / "m" / "..", "names no new folder"),
    ):
        assert_exit2(invoke("convert", src, "-o", out, "--force"), words)
        assert snapshot(tmp_path) == before


def test_existing_folder_not_written_by_normexport_is_kept_even_with_force(tmp_path, no_hf_load):
    src = fake_hf_folder(tmp_path / "m")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.onnx").write_text("my notes")  # a name normexport writes, but no report
    (tmp_path / "afile").write_text("keep")
    before = snapshot(tmp_path)
    assert_exit2(invoke("convert", src, "-o", tmp_path / "mine", "--force"), "not a folder normexport wrote")
    assert_exit2(invoke("convert", src, "-o", tmp_path / "afile", "--force"), "not a folder")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Folder outputs: written whole, renamed into place


def staged_folder(parent: Path, tag: str) -> Path:
    d = Path(tempfile.mkdtemp(dir=parent, prefix=".stage."))
    (d / "model.onnx").write_bytes(tag.encode() * 1000)
    write_json({"model": tag}, d / REPORT_NAME)
    return d


def assert_published(out: Path, tag: str):
    assert out.is_dir() and not out.is_symlink()
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.onnx", REPORT_NAME])
    assert (out / "model.onnx").read_bytes() == tag.encode() * 1000
    assert json.loads((out / REPORT_NAME).read_text())["model"] == tag
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_install_folder_replaces_an_own_folder_a_dangling_link_and_a_link(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    outputs.install_folder(staged_folder(tmp_path, "one"), out, OUTPUT_FILES)
    assert_published(out, "one")
    staged = staged_folder(tmp_path, "two")
    outputs.install_folder(staged, out, OUTPUT_FILES)
    assert_published(out, "two")
    assert json.loads((staged / REPORT_NAME).read_text())["model"] == "one"  # the old one, for the caller to remove
    shutil.rmtree(staged)

    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    outputs.install_folder(staged_folder(tmp_path, "three"), tmp_path / "dangling", OUTPUT_FILES)
    assert_published(tmp_path / "dangling", "three")
    assert not (tmp_path / "nowhere").exists()  # replaced, never followed

    target = own_folder(tmp_path / "elsewhere", "kept")
    keep = snapshot(target)
    os.symlink(target, tmp_path / "link")
    staged = staged_folder(tmp_path, "four")
    outputs.install_folder(staged, tmp_path / "link", OUTPUT_FILES)
    assert_published(tmp_path / "link", "four")
    assert snapshot(target) == keep
    assert (staged.is_symlink() or not staged.exists())


def test_install_folder_refuses_a_folder_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    staged = staged_folder(tmp_path, "x")
    with pytest.raises(NormexportError, match="not a folder normexport wrote"):
        outputs.install_folder(staged, out, OUTPUT_FILES)
    assert (out / "mine.txt").read_text() == "keep" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_concurrent_installs_all_succeed_and_the_last_rename_wins(tmp_path):
    out = tmp_path / "same"
    stages = [staged_folder(tmp_path, f"run{i}") for i in range(8)]
    errors, start = [], threading.Barrier(len(stages))

    def run(staged):
        try:
            start.wait()
            outputs.install_folder(staged, out, OUTPUT_FILES)
            shutil.rmtree(staged, ignore_errors=True)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in stages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    winner = json.loads((out / REPORT_NAME).read_text())["model"]
    assert_published(out, winner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]  # no stage, no aside folder left


@pytest.mark.slow
def test_two_real_conversions_into_one_dangling_link_both_succeed(tmp_path):
    """Two `convert DIR -o SAME` at once, SAME a dangling symlink: both exit 0, the folder is
    whole and decodes, the link's target is never created, no temp is left."""
    pytest.importorskip("transformers")
    from hf_folders import save_tiny
    from normexport.hf.generation import OnnxDecoder

    src = save_tiny("llama", tmp_path / "m")
    os.symlink(tmp_path / "nowhere", tmp_path / "same")
    args = [*CLI, "convert", str(src), "-o", str(tmp_path / "same"), "--no-validate", "--no-bench"]
    procs = [subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    out = tmp_path / "same"
    assert out.is_dir() and not out.is_symlink() and not (tmp_path / "nowhere").exists()
    assert {"model.onnx", "genai_config.json", REPORT_NAME} <= {p.name for p in out.iterdir()}
    tokens, _ = OnnxDecoder(out).generate([5, 17, 300], 4)
    assert len(tokens) == 4 and all(0 <= t < 1000 for t in tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "same"]


# ---------------------------------------------------------------------------------------------
# The guard over folders: a property test. Outputs and reports spelled through symlinks, hard
# links and '..' are refused exactly when they collide with an input, each other or a folder
# normexport may not replace; the check writes nothing, and a write after it leaves every
# file of the user's as it was.

OUT_CHOICES = {  # logical -o target: refused?
    "new": False, "prev": False, "sub": False, "dangling": False, "ln_prev": False, "m/newsub": False,
    "m": True, "ln_m": True, ".": True, "other": True, "m/config.json": True,
}
REPORT_CHOICES = (None, "r.json", "m/new.json", "m/config.json", "hl_config.json", "ln_cfg", "other/notes.txt",
                  "prev/" + REPORT_NAME, "hl_prev_report.json", "<O>", "<O>/model.onnx", "<O>/" + REPORT_NAME, "<O>/x.json")
SPELLINGS = ("plain", "dotdot", "via_link", "dot")


def _layout(root: Path) -> None:
    fake_hf_folder(root / "m")
    own_folder(root / "prev", "prev")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("the user's notes")
    (root / "sub").mkdir()
    os.link(root / "m" / "config.json", root / "hl_config.json")
    os.link(root / "prev" / REPORT_NAME, root / "hl_prev_report.json")
    os.symlink(root / "m", root / "ln_m")
    os.symlink(root / "prev", root / "ln_prev")
    os.symlink(root / "m" / "config.json", root / "ln_cfg")
    os.symlink(root / "nowhere", root / "dangling")
    os.symlink(root, root / "ln_root")


def _spell(root: Path, logical: str, how: str) -> Path:
    if logical == ".":
        return root
    if how == "dotdot":
        return root / "sub" / ".." / logical
    if how == "via_link":
        return root / "ln_root" / logical
    if how == "dot":
        return Path(str(root / "." / logical))
    return root / logical


def _report_refused(o: str, r: str | None, force: bool) -> bool:
    if r is None or r in ("r.json", "m/new.json"):
        return False
    if r.startswith("<O>"):
        return True  # the folder itself, or a file in it
    if r in ("m/config.json", "hl_config.json", "ln_cfg"):
        return True  # an input, however spelled
    if r == "other/notes.txt":
        return not force  # a file of another kind: --force replaces it
    if r in ("prev/" + REPORT_NAME, "hl_prev_report.json"):
        return o in ("prev", "ln_prev")  # a file of the folder -o replaces; else an own report
    raise AssertionError(r)


USER_FILES = ("m/config.json", "m/model.safetensors", "m/tokenizer.json", "hl_config.json", "other/notes.txt", "ln_m", "ln_cfg", "ln_root")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(o=st.sampled_from(sorted(OUT_CHOICES)), r=st.sampled_from(REPORT_CHOICES), o_how=st.sampled_from(SPELLINGS),
       r_how=st.sampled_from(SPELLINGS), force=st.booleans(), input_how=st.sampled_from(("plain", "via_link", "dotdot")))
def test_guard_over_folders_refuses_exactly_the_collisions(o, r, o_how, r_how, force, input_how):
    root = Path(tempfile.mkdtemp(prefix="guard-")).resolve()
    try:
        _layout(root)
        src = _spell(root, "m", input_how)
        out = _spell(root, o, o_how)
        report = None if r is None else (Path(str(out) + r[3:]) if r.startswith("<O>") else _spell(root, r, r_how))
        expect_refused = OUT_CHOICES[o] or _report_refused(o, r, force)
        before = snapshot(root)
        refused = None
        try:
            outputs.check([src], [output_folder(out), outputs.Output("--report", report, "report")], force)
        except NormexportError as e:
            refused = e
        assert (refused is not None) == expect_refused, (o, r, o_how, r_how, force, refused)
        assert snapshot(root) == before  # the check writes nothing, not even a probe
        if refused is not None:
            return
        replaced = {"other/notes.txt"} if r == "other/notes.txt" else set()  # with --force, as asked
        user = {k: v for k, v in before.items() if k in USER_FILES and k not in replaced}
        staged = staged_folder(out.parent, "new")
        try:
            outputs.install_folder(staged, out, OUTPUT_FILES)
        finally:  # what was at -o before: the caller removes it
            if staged.is_symlink():
                staged.unlink()
            shutil.rmtree(staged, ignore_errors=True)
        if report is not None:
            write_json({"report": True}, report)
        after = snapshot(root)
        assert {k: after.get(k) for k in user} == user, (o, r)
        assert_published(out, "new")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Factories


@pytest.fixture(scope="module")
def factory_work(tmp_path_factory) -> Path:
    from normexport.load import save_exported, save_torchscript

    d = tmp_path_factory.mktemp("factory")
    shutil.copy(ROOT / "tests" / "own_model.py", d / "facmod.py")
    (d / "pkg").mkdir()
    (d / "pkg" / "__init__.py").write_text("")
    shutil.copy(ROOT / "tests" / "own_model.py", d / "pkg" / "facmod.py")
    torch.save(own_model.build().state_dict(), d / "sd.pt")
    save_torchscript(own_model.build(), own_model.example_inputs(), d / "m.ts")
    save_exported(own_model.build(), own_model.example_inputs(), d / "m.pt2")
    rms_graphs_model, _ = rms_graphs.build(rms_graphs.Spelling())
    onnx.save(rms_graphs_model, str(d / "f.onnx"))
    (d / "exits.py").write_text(
        "import sys\n"
        "def zero():\n    raise SystemExit(0)\n"
        "def code():\n    sys.exit(3)\n"
        "def interrupt():\n    raise KeyboardInterrupt\n"
        "def slow():\n    import os, time\n    open(os.environ['FACTORY_STARTED'], 'w').close()\n    time.sleep(60)\n"
    )
    (d / "exits_on_import.py").write_text("import sys\nsys.exit(0)\ndef make():\n    pass\n")
    return d


@pytest.mark.parametrize("spec,words", [
    ("sys:exit", ["--factory sys:exit raised SystemExit"]),
    ("exits:zero", ["raised SystemExit (0)"]),
    ("exits.py:code", ["raised SystemExit (3)"]),
    ("exits:interrupt", ["raised KeyboardInterrupt"]),
    ("exits_on_import:make", ["importing 'exits_on_import' raised SystemExit (0)"]),
])
def test_factory_that_exits_is_exit_2_naming_it(factory_work, spec, words):
    before = snapshot(factory_work)
    r = invoke("convert", "sd.pt", "--factory", spec, "--no-bench", cwd=factory_work)
    assert_exit2(r, *words)
    assert snapshot(factory_work) == before


def test_ctrl_c_during_a_factory_still_interrupts(factory_work, tmp_path):
    """A real SIGINT while the factory runs is an interrupt (130), not the factory's failure."""
    started = tmp_path / "started"
    p = subprocess.Popen([*CLI, "convert", "sd.pt", "--factory", "exits:slow", "--no-bench", "-o", str(tmp_path / "o.onnx")],
                         cwd=factory_work, env={**env(), "FACTORY_STARTED": str(started)}, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not started.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert started.exists(), p.stderr.read() if p.poll() is not None else "the factory did not start"
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=60)
    err = p.stderr.read()
    assert rc == 130 and "interrupted" in err and "KeyboardInterrupt" not in err, (rc, err)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("spelling", ["facmod:factory", "facmod.py:factory", "./facmod.py:factory", "ABS:factory", "pkg.facmod:factory"])
def test_factory_source_is_an_input_however_spelled(factory_work, spelling):
    spec = spelling.replace("ABS", str(factory_work / "facmod.py"))
    target = factory_work / ("pkg/facmod.py" if spelling.startswith("pkg") else "facmod.py")
    before = snapshot(factory_work)
    for option in ("--report", "-o"):
        r = invoke("convert", "sd.pt", "--factory", spec, option, target, "--force", "--no-bench", cwd=factory_work)
        assert_exit2(r, "the same file as the input")
    r = invoke("validate", "sd.pt", "f.onnx", "--factory", spec, "--report", target, "--force", cwd=factory_work)
    assert_exit2(r, "the same file as the input")
    assert snapshot(factory_work) == before


def test_factory_source_found_without_running_it(factory_work, monkeypatch):
    from normexport.factory import factory_source

    monkeypatch.chdir(factory_work)
    assert factory_source("exits_on_import:make") == factory_work / "exits_on_import.py"  # found, not imported
    assert "exits_on_import" not in sys.modules
    assert factory_source("pkg.facmod:factory") == factory_work / "pkg" / "facmod.py"
    assert factory_source("sys:exit") is None and factory_source("no_such_module:f") is None


@pytest.mark.parametrize("model", ["m.ts", "m.pt2"])
def test_factory_with_an_archive_that_holds_its_module_is_refused(factory_work, model):
    for cmd in (["convert", model, "--no-bench"], ["validate", model, "f.onnx"], ["inspect", model]):
        assert_exit2(invoke(*cmd, "--factory", "facmod:factory", cwd=factory_work), "--factory is only for state_dicts")


def test_factory_with_an_onnx_model_is_refused(factory_work):
    assert_exit2(invoke("inspect", "f.onnx", "--factory", "facmod:factory", cwd=factory_work), "ONNX model", "--factory")


# ---------------------------------------------------------------------------------------------
# The Python API: the CLI's checks, NormexportErrors


@pytest.mark.parametrize("kwargs,words", [
    (dict(output=5), "output=5"),
    (dict(output=""), "output=''"),
    (dict(samples=0), "samples=0"),
    (dict(samples=101), "samples=101"),
    (dict(samples=True), "samples=True"),
    (dict(atol=-1), "atol -1"),
    (dict(atol=float("nan")), "atol nan"),
    (dict(rtol=float("inf")), "rtol inf"),
    (dict(atol={"out": float("nan")}), "atol for 'out'"),
    (dict(atol={5: 1e-3}), "output name 5"),
    (dict(atol="1e-3"), "not a number"),
    (dict(threads=0), "threads=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(opset=3), "opset=3"),
    (dict(exporter="x"), "exporter='x'"),
    (dict(residual="sometimes"), "residual='sometimes'"),
    (dict(backend="gpu9"), "backend='gpu9'"),
    (dict(dtype="float8"), "dtype='float8'"),
    (dict(validate="yes"), "validate='yes'"),
    (dict(force=1), "force=1"),
    (dict(keep_failed=None), "keep_failed=None"),
    (dict(factory="facmod:factory"), "a module in memory needs none"),
])
def test_api_convert_refuses_bad_options_before_any_work(tmp_path, monkeypatch, kwargs, words):
    import normexport
    from normexport import pipeline

    monkeypatch.setattr(pipeline, "convert_loaded", lambda *a, **k: pytest.fail("the model was exported before its options were checked"))
    kwargs = {"output": tmp_path / "o.onnx", **kwargs}
    with pytest.raises(NormexportError) as e:
        normexport.convert(own_model.build(), own_model.example_inputs(), **kwargs)
    assert words in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_api_missing_input_and_bad_validate_bench_options(tmp_path):
    import normexport

    model, ex = own_model.build(), own_model.example_inputs()
    fused = rms_graphs.build(rms_graphs.Spelling())[0]
    with pytest.raises(NormexportError, match="have no 'bias'"):
        normexport.convert(model, {"input_ids": ex["input_ids"]}, output=tmp_path / "o.onnx")
    with pytest.raises(NormexportError, match="have no 'bias'"):
        normexport.validate(model, fused, {"input_ids": ex["input_ids"]})
    with pytest.raises(NormexportError, match="samples=0"):
        normexport.validate(model, fused, ex, samples=0)
    with pytest.raises(NormexportError, match="atol -1"):
        normexport.validate(model, fused, ex, atol=-1)
    with pytest.raises(NormexportError, match="iters=0"):
        normexport.bench(model, fused, ex, iters=0)
    with pytest.raises(NormexportError, match="warmup=-1"):
        normexport.bench(model, fused, ex, warmup=-1)
    assert list(tmp_path.iterdir()) == []


def test_cli_and_api_share_the_ranges():
    from normexport import cli, options

    params = {p.name: p for p in cli.convert.params}
    for name, bounds in (("samples", options.SAMPLES), ("seed", options.SEED), ("threads", options.THREADS), ("warmup", options.WARMUP), ("iters", options.ITERS), ("opset", options.OPSET)):
        t = params[name].type
        assert (t.min, t.max) == bounds, name
    assert tuple(params["dtype"].type.choices) == options.DTYPES
    assert tuple(params["exporter"].type.choices) == options.EXPORTERS


def test_api_accepts_what_the_cli_accepts(tmp_path):
    """The checks refuse nothing valid: a real conversion through the API with tolerances by
    output and the extreme ends of the ranges, against PyTorch on fresh inputs."""
    import normexport
    from normexport.testing import assert_onnx_matches

    model, ex = own_model.build(), own_model.example_inputs()
    r = normexport.convert(model, ex, output=str(tmp_path / "o.onnx"), samples=1, atol={None: 1e-4, "output": 1e-4}, rtol=0, seed=2**32 - 1, threads=1)
    assert r.passed and r.output == tmp_path / "o.onnx"
    fresh = {"input_ids": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(7)), "bias": torch.randn(2, 12, 48)}
    assert_onnx_matches(model, r.output, fresh, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Markup never comes from data


def test_paths_with_markup_print_literally(tmp_path):
    (tmp_path / "m[").mkdir()
    (tmp_path / "x[").mkdir()
    model = tmp_path / "m[/bold].onnx"
    onnx.save(rms_graphs.build(rms_graphs.Spelling())[0], str(model))
    r = invoke("inspect", model)
    assert r.exit_code == 0, r.stderr
    assert "m[/bold].onnx" in r.output
    out = tmp_path / "x[/bold][red]y.onnx"
    r = invoke("fuse", model, "-o", out, "--report", tmp_path / "[b]r.json")
    assert r.exit_code == 0, r.stderr
    assert f"wrote {out}" in " ".join(r.output.split())
    sp = rms_graphs.Spelling()
    graph, feed = rms_graphs.build(sp)
    np.testing.assert_allclose(ort_helper.run(out, feed)[0], rms_graphs.reference(sp, graph, feed), atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "[b]r.json").read_text())["output"] == str(out)


def test_onnx_names_with_markup_print_literally(tmp_path):
    m = rms_graphs.build(rms_graphs.Spelling())[0]
    for i, n in enumerate(m.graph.node):
        n.name = f"[/red]node{i}[bold]"
    path = tmp_path / "names.onnx"
    onnx.save(m, str(path))
    r = invoke("inspect", path)
    assert r.exit_code == 0, r.stderr
    r = invoke("fuse", path, "-o", tmp_path / "f.onnx")
    assert r.exit_code == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# Odd metadata and paths


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return tmp_path_factory.mktemp("ts"), torch.jit.script(own_model.build())


@pytest.mark.parametrize("meta,words", [
    ("[1, 2]", "is a JSON list"),
    ('"inputs"', "is a JSON str"),
    ("7", "is a JSON int"),
    ('{"inputs": {"a": 1}}', "not a list of objects"),
    ('{"inputs": [1]}', "not a list of objects"),
    (json.dumps({"inputs": [{"name": "input_ids", "dtype": "int64", "shape": [2, 12], "low": 0, "high": 100},
                            {"name": "bias", "dtype": "float32", "shape": [100000, 1000000]}]}), "1e+11 elements"),
])
def test_torchscript_metadata_that_is_not_input_specs(scripted, meta, words):
    folder, module = scripted
    path = folder / "m.pt"
    torch.jit.save(module, str(path), _extra_files={"normexport.json": meta})
    assert_exit2(invoke("convert", path, "-o", folder / "o.onnx", "--no-bench"), *words)
    assert not (folder / "o.onnx").exists()


@pytest.mark.parametrize("example,words", [
    ({"input_ids": [1, 2], "bias": None}, "entry 'input_ids' is a list"),
    ({"input_ids": torch.zeros(2, 12, dtype=torch.long), "bias": "hello"}, "entry 'bias' is a str"),
    ({1: torch.zeros(2)}, "under a int key"),
])
def test_checkpoint_example_inputs_that_are_not_tensors(tmp_path, example, words):
    torch.save({"state_dict": own_model.build().state_dict(), "example_inputs": example}, tmp_path / "ck.pt")
    r = invoke("convert", tmp_path / "ck.pt", "--factory", "own_model:factory", "-o", tmp_path / "o.onnx", "--no-bench", cwd=ROOT / "tests")
    assert_exit2(r, *words)
    assert not (tmp_path / "o.onnx").exists()


def test_declared_shape_larger_than_the_machine_is_refused_with_its_size(factory_work):
    from normexport.inputs import input_budget

    r = invoke("convert", "m.ts", "--input", "bias:float32:100000x1000000", "--no-bench", cwd=factory_work)
    assert_exit2(r, "1e+11 elements", "373 GiB as float32", f"{input_budget() / 2**30:.3g} GiB")


def test_convert_of_a_plain_directory(tmp_path):
    (tmp_path / "d").mkdir()
    for spelled in (".", "./", str(tmp_path / "d"), "/"):
        assert_exit2(invoke("convert", spelled, cwd=tmp_path / "d"), "is a directory", "not a Hugging Face model folder")
    assert list((tmp_path / "d").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_paths_past_the_file_systems_limits(tmp_path, factory_work):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    long_name = "a" * (name_max + 1)
    deep = "/".join(["d" * 200] * (os.pathconf(tmp_path, "PC_PATH_MAX") // 200 + 2))
    cases = [
        ["convert", f"{long_name}.pt"], ["convert", f"{deep}/x.pt"], ["inspect", f"{long_name}.onnx"],
        ["fuse", f"{long_name}.onnx"], ["validate", f"{long_name}.pt", "f.onnx"], ["bench", "sd.pt", f"{long_name}.onnx", "--factory", "facmod:factory"],
        ["generate", long_name, "--prompt-ids", "1"], ["convert", "sd.pt/x"], ["fuse", "f.onnx", "-o", f"{deep}/x.onnx"],
        ["convert", "sd.pt", "--factory", "facmod:factory", "-o", f"{long_name}.onnx"],
    ]
    before = snapshot(factory_work)
    for args in cases:
        r = invoke(*args, cwd=factory_work)
        assert_exit2(r)
        assert any(w in r.stderr for w in ("too long", "Not a directory", "longer than")), (args, r.stderr)
    assert snapshot(factory_work) == before
