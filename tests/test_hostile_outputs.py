"""Nothing the user has is overwritten or left half-written: outputs that are inputs (however
spelled), the input's external data, another output of the run, files of another kind, places
that cannot be written, interrupts, a full disk, concurrent runs, planted symlinks."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ort_helper
import own_model
import rms_graphs
from cli_helper import invoke, snapshot
from normexport import outputs, pipeline

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Helpers





def assert_refused(result, folder: Path, before: dict, *words):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    for w in words:
        assert w in result.stderr, result.stderr
    assert snapshot(folder) == before


@pytest.fixture
def no_load(monkeypatch):
    """Refusals come before the model is loaded or exported."""

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(pipeline, "prepare_model", loaded)
    monkeypatch.setattr(pipeline, "prepare_model_for", loaded)


def tiny_onnx(path: Path) -> Path:
    m, _ = rms_graphs.build(rms_graphs.Spelling())
    onnx.save(m, str(path))
    return path


def norm_linear_onnx(path: Path, hidden: int, seed: int = 0, data: str | None = None) -> Path:
    """x -> RMSNorm (Pow, ReduceMean, Add, Sqrt, Div, Mul) -> MatMul(W[hidden, hidden]): a
    model whose size is set by ``hidden`` (4·hidden² bytes)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), "g"),
        numpy_helper.from_array((rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32), "W"),
    ]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
        helper.make_node("Add", ["ms", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["rms"]),
        helper.make_node("Div", ["x", "rms"], ["xn"]),
        helper.make_node("Mul", ["xn", "g"], ["y"]),
        helper.make_node("MatMul", ["y", "W"], ["out"]),
    ]
    g = helper.make_graph(
        nodes, "norm_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, hidden])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, hidden])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=rms_graphs.IR_VERSION)
    if data:
        onnx.save(m, str(path), save_as_external_data=True, location=data, size_threshold=0)
    else:
        onnx.save(m, str(path))
    return path


def temps_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


CLI = [sys.executable, "-c", "from normexport.cli import main; main()"]


@pytest.fixture(scope="module")
def pt2(tmp_path_factory) -> Path:
    from normexport.load import save_exported

    path = tmp_path_factory.mktemp("pt2") / "m.pt2"
    save_exported(own_model.build(), own_model.example_inputs(), path)
    return path


@pytest.fixture
def work(tmp_path, pt2) -> Path:
    (tmp_path / "m.pt2").write_bytes(pt2.read_bytes())
    tiny_onnx(tmp_path / "F.onnx")
    return tmp_path


# ---------------------------------------------------------------------------------------------
# An output that is an input, however spelled, or another output


def test_convert_report_naming_the_input_is_refused(work, no_load):
    before = snapshot(work)
    assert_refused(invoke("convert", "m.pt2", "--report", "m.pt2", cwd=work), work, before, "--report m.pt2", "input")


def test_validate_report_naming_the_fused_model_is_refused(work, no_load):
    before = snapshot(work)
    assert_refused(invoke("validate", "m.pt2", "F.onnx", "--report", "F.onnx", cwd=work), work, before, "F.onnx", "input")


def test_bench_plot_naming_the_fused_model_is_refused(work, no_load):
    before = snapshot(work)
    assert_refused(invoke("bench", "m.pt2", "F.onnx", "--plot", "F.onnx", cwd=work), work, before, "--plot")


def test_output_and_report_the_same_file_is_refused(work, no_load):
    (work / "sub").mkdir()
    before = snapshot(work)
    assert_refused(invoke("convert", "m.pt2", "-o", "out.onnx", "--report", "out.onnx", cwd=work), work, before, "-o out.onnx")
    assert_refused(invoke("bench", "m.pt2", "F.onnx", "--plot", "p.png", "--report", "./sub/../p.png", cwd=work), work, before, "--plot p.png")


def spell(work: Path, name: str, spelling: str) -> str:
    """Another path to ``work / name``: a hard link, a symlink, through ``..``, absolute."""
    (work / "sub").mkdir(exist_ok=True)
    if spelling == "hard":
        os.link(work / name, work / "sub" / f"h-{name}")
        return f"sub/h-{name}"
    if spelling == "symlink":
        (work / "sub" / f"s-{name}").symlink_to(work / name)
        return f"sub/s-{name}"
    if spelling == "dotdot":
        return f"sub/../{name}"
    return str(work / name)


@pytest.mark.parametrize("spelling", ["hard", "symlink", "dotdot", "absolute"])
def test_input_spelled_another_way_is_refused(work, no_load, spelling):
    model, fused = spell(work, "m.pt2", spelling), spell(work, "F.onnx", spelling)
    before = snapshot(work)
    assert_refused(invoke("convert", "m.pt2", "--report", model, cwd=work), work, before, "input m.pt2")
    assert_refused(invoke("convert", "m.pt2", "-o", model, cwd=work), work, before, "input m.pt2")
    assert_refused(invoke("validate", "m.pt2", "F.onnx", "--report", fused, cwd=work), work, before, "input F.onnx")
    assert_refused(invoke("fuse", "F.onnx", "-o", fused, cwd=work), work, before, "input F.onnx")
    assert_refused(invoke("fuse", "F.onnx", "-o", "x.onnx", "--report", fused, cwd=work), work, before, "input F.onnx")


def test_fuse_output_naming_the_inputs_external_data_is_refused(tmp_path):
    ext = tmp_path / "ext"
    ext.mkdir()
    norm_linear_onnx(ext / "model.onnx", 32, data="model.onnx.data")
    before = snapshot(tmp_path)
    assert_refused(invoke("fuse", ext / "model.onnx", "-o", ext / "model.onnx.data"), tmp_path, before, "external data of the input")
    assert_refused(invoke("fuse", ext / "model.onnx", "-o", tmp_path / "x.onnx", "--report", ext / "model.onnx.data"), tmp_path, before, "external data")
    # -o whose own external data file (written for a model over 2 GB) would be the input's
    norm_linear_onnx(ext / "b.onnx", 32, data="c.onnx.data")
    before = snapshot(tmp_path)
    assert_refused(invoke("fuse", ext / "b.onnx", "-o", ext / "c.onnx"), tmp_path, before, "c.onnx.data")
    # a different output is written, the input and its data untouched
    r = invoke("fuse", ext / "model.onnx", "-o", ext / "fused.onnx")
    assert r.exit_code == 0, r.stderr
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before


def test_validate_report_naming_the_fused_models_external_data_is_refused(work, no_load):
    norm_linear_onnx(work / "E.onnx", 16, data="E.bin")
    before = snapshot(work)
    assert_refused(invoke("validate", "m.pt2", "E.onnx", "--report", "E.bin", cwd=work), work, before, "E.bin")


def test_ln2rms_output_or_report_naming_the_input_is_refused(tmp_path):
    model = tmp_path / "gpt2.pt"
    model.write_bytes(b"weights")
    before = snapshot(tmp_path)
    for args in (["-o", model], ["-o", tmp_path / "o.pt2", "--report", model], ["-o", tmp_path / "o.pt2", "--report", tmp_path / "o.pt2"]):
        r = invoke("ln2rms", model, "--factory", "models.gpt2_style:gpt2_small", *args)
        assert_refused(r, tmp_path, before, "same file")


# ---------------------------------------------------------------------------------------------
# Existing files of another kind; --force


def test_existing_file_at_report_is_kept_unless_force(work, no_load):
    notes = work / "notes.json"
    notes.write_text('{"mine": true}\n')
    before = snapshot(work)
    assert_refused(invoke("validate", "m.pt2", "F.onnx", "--report", "notes.json", cwd=work), work, before, "not a normexport JSON report", "--force")
    assert_refused(invoke("bench", "m.pt2", "F.onnx", "--plot", "notes.json", cwd=work), work, before, "--force")
    # --force never lets an output be an input
    assert_refused(invoke("validate", "m.pt2", "F.onnx", "--report", "F.onnx", "--force", cwd=work), work, before, "input")


def test_fuse_replaces_its_own_outputs_and_refuses_others(work):
    out, rep = work / "out.onnx", work / "rep.json"
    out.write_text("my notes\n")
    rep.write_text("my report\n")
    before = snapshot(work)
    assert_refused(invoke("fuse", "F.onnx", "-o", out, cwd=work), work, before, "not an ONNX model")
    assert_refused(invoke("fuse", "F.onnx", "-o", work / "new.onnx", "--report", rep, cwd=work), work, before, "not a normexport JSON report")
    r = invoke("fuse", "F.onnx", "-o", out, "--report", rep, "--force", cwd=work)
    assert r.exit_code == 0, r.stderr
    assert outputs.is_own(rep, "report") and outputs.is_own(out, "onnx")
    # re-running replaces normexport's own outputs without --force
    first = snapshot(work)
    r = invoke("fuse", "F.onnx", "-o", out, "--report", rep, "--target", "onnx", cwd=work)
    assert r.exit_code == 0, r.stderr
    assert onnx.load(str(out)).opset_import[0].version == 23
    assert snapshot(work)["rep.json"] != first["rep.json"]
    assert temps_in(work) == []


def test_plot_is_recognised_as_normexports_own(tmp_path):
    pytest.importorskip("matplotlib")
    from normexport.bench import BenchReport, Latency
    from normexport.plot import plot_bench

    rep = BenchReport(threads=1, warmup=1, iters=3, input_sets=1)
    rep.latency_ms = {"onnx_unfused": Latency.of([0.002, 0.003, 0.0025]), "onnx_fused": Latency.of([0.001, 0.0012, 0.0011])}
    png = tmp_path / "p.png"
    plot_bench(rep, png)
    assert outputs.is_own(png, "plot")
    import matplotlib.pyplot as plt

    other = tmp_path / "other.png"
    plt.figure().savefig(other)
    assert other.read_bytes()[:8] == png.read_bytes()[:8]  # both PNG, only ours is marked
    assert not outputs.is_own(other, "plot")


def test_symlink_at_output_is_replaced_not_written_through(work):
    victim = work / "victim.txt"
    victim.write_text("precious\n")
    (work / "out.onnx").symlink_to(victim)
    before = snapshot(work)
    assert_refused(invoke("fuse", "F.onnx", "-o", "out.onnx", cwd=work), work, before, "not an ONNX model")
    r = invoke("fuse", "F.onnx", "-o", "out.onnx", "--force", cwd=work)
    assert r.exit_code == 0, r.stderr
    assert victim.read_text() == "precious\n"
    assert not (work / "out.onnx").is_symlink() and outputs.is_own(work / "out.onnx", "onnx")


def test_symlinks_planted_at_predictable_names_are_not_followed(work):
    victim = work / "victim.txt"
    victim.write_text("precious\n")
    for name in (".out.onnx.partial", ".out.onnx.tmp", ".rep.json.tmp", ".rep.json.partial"):
        (work / name).symlink_to(victim)
    (work / "out.onnx.data").symlink_to(victim)  # where a model over 2 GB would put its weights
    before = snapshot(work)
    assert_refused(invoke("fuse", "F.onnx", "-o", "out.onnx", cwd=work), work, before, "out.onnx.data")
    (work / "out.onnx.data").unlink()
    r = invoke("fuse", "F.onnx", "-o", "out.onnx", "--report", "rep.json", cwd=work)
    assert r.exit_code == 0, r.stderr
    assert victim.read_text() == "precious\n"
    assert all((work / n).is_symlink() for n in (".out.onnx.partial", ".out.onnx.tmp", ".rep.json.tmp"))
    ort_helper.session(work / "out.onnx", optimize=True)


# ---------------------------------------------------------------------------------------------
# Places that cannot be written: refused before any work


def test_folder_missing_or_a_folder_or_name_too_long_is_refused_before_loading(work, no_load):
    (work / "d").mkdir()
    before = snapshot(work)
    long = "a" * 300 + ".json"
    cases = [
        (["convert", "m.pt2", "-o", "d"], "is a folder"),
        (["convert", "m.pt2", "--report", "d"], "is a folder"),
        (["convert", "m.pt2", "-o", "missing/out.onnx"], "does not exist"),
        (["validate", "m.pt2", "F.onnx", "--report", "missing/r.json"], "does not exist"),
        (["bench", "m.pt2", "F.onnx", "--plot", "F.onnx/p.png"], "not a folder"),
        (["convert", "m.pt2", "--report", long], "longer than this file system allows"),
        (["convert", "m.pt2", "-o", "b" * 247 + ".onnx"], ".onnx.data"),  # its external data name would not fit
        (["convert", "m.pt2", "--report", "/dev/null"], "not a regular file"),
    ]
    for args, words in cases:
        assert_refused(invoke(*args, cwd=work), work, before, words)


def test_read_only_folder_is_refused_before_loading(work, no_load):
    """Root ignores permission bits: as root the folder is made immutable (chattr +i)."""
    ro = work / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(ro)], capture_output=True, text=True) if shutil.which("chattr") else None
        if made is None or made.returncode != 0:
            pytest.skip(f"running as root, and chattr +i is not available here ({made.stderr.strip() if made else 'no chattr'}): no folder root cannot write")
    else:
        os.chmod(ro, 0o555)
    try:
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")
        before = snapshot(work)
        for args in (["fuse", "F.onnx", "-o", "ro/out.onnx"], ["validate", "m.pt2", "F.onnx", "--report", "ro/r.json"], ["convert", "m.pt2", "-o", "ro/out.onnx"]):
            assert_refused(invoke(*args, cwd=work), work, before, "cannot write in ro")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        else:
            os.chmod(ro, 0o755)


# ---------------------------------------------------------------------------------------------
# Temp folders: none left after an early error


def test_early_error_leaves_no_temp_folder(work, monkeypatch):
    private = work / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    r = invoke("convert", "m.pt2", "--exporter", "torchscript", "-o", "out.onnx", cwd=work)
    assert r.exit_code == 2, r.stderr
    assert "TorchScript exporter" in r.stderr
    assert [p.name for p in private.iterdir() if p.name.startswith("normexport")] == []
    assert not (work / "out.onnx").exists() and temps_in(work) == []


# ---------------------------------------------------------------------------------------------
# Atomic writes: interrupts, a full disk, concurrent runs


WRITER = r"""
import os, signal, sys, time
from pathlib import Path
from normexport import outputs
outputs.install_signal_handlers()
def write(tmp):
    with open(tmp, "r+b") as f:
        for i in range(10_000):
            f.write(os.urandom(1 << 20))
            f.flush()
            if i == 2:
                print("writing", flush=True)
            time.sleep(0.01)
try:
    outputs.write_with(Path(sys.argv[1]), write)
except KeyboardInterrupt as e:
    sys.exit(getattr(e, "exit_code", 130))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_a_write_leaves_the_previous_file_and_no_temp(tmp_path, sig):
    out = tmp_path / "out.bin"
    out.write_bytes(b"previous")
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], env=env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert temps_in(tmp_path), "the temp file being written is beside the output"
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    assert rc == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM)
    assert out.read_bytes() == b"previous"
    assert temps_in(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_fuse_writes_a_large_model(tmp_path, sig):
    src = norm_linear_onnx(tmp_path / "big.onnx", 7168)  # ~205 MB of weights
    out = tmp_path / "out.onnx"
    tiny_onnx(out)
    previous = out.read_bytes()
    p = subprocess.Popen(CLI + ["fuse", str(src), "-o", str(out)], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = None
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:
        seen = [n for n in temps_in(tmp_path) if n.startswith(".out.onnx.") and _size(tmp_path / n) > 0]
        if seen:  # bytes of the model are being written (not the empty probe of the folder check)
            break
        time.sleep(0.002)
    assert seen, f"fuse finished before its write was seen (rc {p.returncode})"
    p.send_signal(sig)
    rc = p.wait(timeout=300)
    err = p.stderr.read()
    assert rc == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM), err
    assert "interrupted" in err and "Traceback" not in err
    assert out.read_bytes() == previous
    assert temps_in(tmp_path) == []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsize_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_is_exit_2_and_leaves_the_previous_file(tmp_path):
    src = norm_linear_onnx(tmp_path / "m.onnx", 512)  # 1 MB of weights
    out = tmp_path / "out.onnx"
    tiny_onnx(out)
    before = snapshot(tmp_path)
    r = subprocess.run(CLI + ["fuse", str(src), "-o", str(out), "--report", str(tmp_path / "r.json")], env=env(), preexec_fn=_fsize_limit(256 << 10), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "no space" in lines[0] and lines[1].startswith("hint: "), r.stderr
    assert snapshot(tmp_path) == before


def test_full_disk_while_writing_a_report(tmp_path):
    from normexport.report import write_json

    rep = tmp_path / "r.json"
    write_json({"a": 1}, rep)
    before = snapshot(tmp_path)
    code = f"""
import sys
from normexport.report import write_json
from normexport.errors import NormexportError
try:
    write_json({{"big": "x" * (1 << 20)}}, {str(rep)!r})
except NormexportError as e:
    print(e.message); sys.exit(2)
"""
    r = subprocess.run([sys.executable, "-c", code], env=env(), preexec_fn=_fsize_limit(64 << 10), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no space" in r.stdout, (r.stdout, r.stderr)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_concurrent_fuse_runs_to_one_output_give_one_complete_model(tmp_path):
    src = norm_linear_onnx(tmp_path / "m.onnx", 1024)  # 4 MB
    out = tmp_path / "out.onnx"
    x = np.random.default_rng(5).standard_normal((1, 4, 1024)).astype(np.float32)
    ref = ort_helper.session(src, optimize=True).run(None, {"x": x})[0]
    for round_ in range(3):
        procs = [
            subprocess.Popen(CLI + ["fuse", str(src), "-o", str(out), "--target", t], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for t in ("ort", "onnx")
        ]
        for p in procs:
            assert p.wait(timeout=600) == 0, p.stderr.read()
        m = onnx.load(str(out))
        ops = {n.op_type for n in m.graph.node}
        assert ops & {"SimplifiedLayerNormalization", "RMSNormalization"}, (round_, ops)
        got = ort_helper.session(out, optimize=True).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        assert temps_in(tmp_path) == []


def test_external_data_model_is_written_data_first_and_loads(tmp_path, monkeypatch):
    from normexport.fuse import load_onnx, save_onnx

    src = norm_linear_onnx(tmp_path / "m.onnx", 64)
    out = tmp_path / "o" / "fused.onnx"
    out.parent.mkdir()
    model = load_onnx(src)
    order = []
    real_replace = os.replace

    def spy(a, b):
        if Path(b).parent == out.parent:  # into place (onnx_ir also renames inside its temp folder)
            order.append(Path(b).name)
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", spy)
    save_onnx(model, out, external=True)
    monkeypatch.undo()
    assert order == ["fused.onnx.data", "fused.onnx"]
    assert outputs.external_data_files(out) == [out.parent / "fused.onnx.data"]
    x = np.random.default_rng(1).standard_normal((1, 4, 64)).astype(np.float32)
    np.testing.assert_allclose(ort_helper.session(out, optimize=True).run(None, {"x": x})[0], ort_helper.session(src, optimize=True).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]


def test_output_folder_removed_during_the_write_is_a_user_error(tmp_path):
    from normexport.errors import NormexportError

    folder = tmp_path / "d"
    folder.mkdir()

    def write(tmp):
        tmp.write_bytes(b"half")
        shutil.rmtree(folder)

    with pytest.raises(NormexportError, match="cannot write the output"):
        outputs.write_with(folder / "o.json", write)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_writer_leaves_the_previous_file_and_no_temp(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("previous")

    def write(tmp):
        tmp.write_text("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        outputs.write_with(out, write)
    with pytest.raises(RuntimeError, match="writer failed"):
        with outputs.staged(tmp_path / "m.onnx.data", tmp_path / "m.onnx") as d:
            (d / "m.onnx.data").write_bytes(b"w")
            raise RuntimeError("writer failed")
    assert out.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
