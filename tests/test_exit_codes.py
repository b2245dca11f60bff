"""The exit-code contract: a user's mistake is exit 2 with exactly one `error:` and one `hint:`
line and no traceback; --debug keeps the code and adds the traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import own_model
import two_input_model as tim
from normexport.cli import main

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exit")
    own = tmp / "own.pt"
    torch.save(own_model.build().state_dict(), own)
    two = tmp / "two.pt"
    torch.save(tim.build().state_dict(), two)
    broken = tmp / "broken_meta.pt"
    torch.save({"state_dict": own_model.build().state_dict(), "normexport": {"inputs": [{"name": "input_ids", "dtype": "int64"}]}}, broken)
    unexp = tmp / "unexp.pt"
    torch.save(tim.Unexportable().state_dict(), unexp)
    return {"own": own, "two": two, "broken": broken, "unexp": unexp, "tmp": tmp, "systemp": tmp_path_factory.mktemp("systemp")}


def _run(args, monkeypatch, files=None):
    monkeypatch.chdir(HERE)
    if files is not None:  # the exporter's logs land in a temp folder of the test's own
        monkeypatch.setattr(tempfile, "tempdir", str(files["systemp"]))
    return CliRunner().invoke(main, args)


def assert_user_error(r, code=2):
    err = r.stderr
    assert r.exit_code == code, r.output
    lines = err.splitlines()
    assert sum(ln.startswith("error: ") for ln in lines) == 1, err
    assert sum(ln.startswith("hint: ") for ln in lines) == 1, err
    assert "Traceback" not in r.output
    assert len(lines) == 2, err  # nothing else: no flood of torch's messages
    return lines[0]


OWN = ["--factory", "own_model:factory", "--no-bench", "--no-validate"]
TWO = ["--factory", "two_input_model:module_only", "--no-bench", "--no-validate"]
BAD = [
    ("threads -1", ["convert", "{own}", *OWN, "--threads", "-1"], "--threads"),
    ("threads 0", ["convert", "{own}", *OWN, "--threads", "0"], "--threads"),
    ("seed 2**70", ["convert", "{own}", *OWN, "--seed", str(2**70)], "--seed"),
    ("seed negative", ["convert", "{own}", *OWN, "--seed", "-3"], "--seed"),
    ("iters 0", ["convert", "{own}", "--factory", "own_model:factory", "--iters", "0"], "--iters"),
    ("atol negative", ["convert", "{own}", *OWN, "--atol", "-1"], "finite and >= 0"),
    ("atol nan", ["convert", "{own}", *OWN, "--atol", "nan"], "finite and >= 0"),
    ("atol inf", ["convert", "{own}", *OWN, "--atol", "inf"], "finite and >= 0"),
    ("rtol not a number", ["convert", "{own}", *OWN, "--rtol", "logits=abc"], "not a number"),
    ("atol empty name", ["convert", "{own}", *OWN, "--atol", "=1e-3"], "empty output name"),
    ("input twice", ["convert", "{own}", *OWN, "--input", "bias:float32:2x12x48", "--input", "bias:float32:2x12x48"], "given twice"),
    ("one of two inputs, no example", ["convert", "{two}", *TWO, "--input", "input_ids:int64:2x6"], "decoder_input_ids"),
    ("unknown input name", ["convert", "{own}", *OWN, "--input", "tokens:int64:2x12"], "not an input of the model"),
    ("range 1.2.3,4", ["convert", "{own}", *OWN, "--input", "bias:float32:2x12x48:1.2.3,4"], "malformed range"),
    ("range -inf", ["convert", "{own}", *OWN, "--input", "bias:float32:2x12x48:-1e999,1"], "not finite"),
    ("range inf", ["convert", "{own}", *OWN, "--input", "bias:float32:2x12x48:0,inf"], "not finite"),
    ("range nan", ["convert", "{own}", *OWN, "--input", "bias:float32:2x12x48:nan,1"], "not finite"),
    ("range low >= high", ["convert", "{own}", *OWN, "--input", "bias:float32:2x12x48:1,1"], "empty range"),
    ("int range fractional", ["convert", "{own}", *OWN, "--input", "input_ids:int64:2x12:0,9.5"], "whole numbers"),
    ("fp16 range overflows", ["convert", "{own}", *OWN, "--input", "bias:float16:2x12x48:0,1e6"], "overflows float16"),
    ("zero dim", ["convert", "{own}", *OWN, "--input", "bias:float32:2x0x48"], "no elements"),
    ("ids beyond vocab", ["convert", "{own}", *OWN, "--input", "input_ids:int64:2x12:0,101"], "beyond the 100 rows"),
    ("wrong input shape", ["convert", "{own}", *OWN, "--input", "bias:float32:2x12x47"], "cannot run on inputs"),
    ("empty example input", ["convert", "{two}", "--factory", "two_input_model:empty_example", "--no-bench"], "no elements"),
    ("broken input metadata", ["convert", "{broken}", *OWN], "input metadata is broken"),
    ("unknown option", ["convert", "{own}", "--bogus"], "No such option"),
    ("missing argument", ["convert"], "Missing argument"),
    ("bad choice", ["convert", "{own}", "--target", "nope"], "--target"),
    ("unknown command", ["frobnicate"], "No such command"),
    ("export fails", ["convert", "{unexp}", "--factory", "two_input_model:unexportable", "--no-bench"], "data-dependent"),
]


@pytest.mark.parametrize("label, args, says", BAD, ids=[b[0] for b in BAD])
def test_bad_invocation_is_exit_2_with_one_error_and_one_hint(files, monkeypatch, label, args, says):
    r = _run([a.format(**files) for a in args], monkeypatch, files)
    first = assert_user_error(r)
    assert says in first


def test_export_failure_names_the_cause_and_logs_the_rest_outside_the_input_folder(files, monkeypatch):
    r = _run(["convert", str(files["unexp"]), "--factory", "two_input_model:unexportable", "--no-bench"], monkeypatch, files)
    error = assert_user_error(r)
    assert "Next steps" not in error and "data-dependent" in error
    hint = r.stderr.splitlines()[1]
    log = Path(hint.split("full exporter log: ", 1)[1].rstrip(")"))
    assert log.exists() and log.parent == files["systemp"] != files["unexp"].parent
    assert "Traceback" in log.read_text()
    log.unlink()


def test_debug_keeps_the_exit_code_and_shows_the_traceback(files, monkeypatch):
    r = _run(["--debug", "convert", str(files["own"]), *OWN, "--input", "input_ids:int64:2x12:0,101"], monkeypatch)
    assert r.exit_code == 2
    assert "Traceback" in r.stderr and "error: " in r.stderr and "hint: " in r.stderr


def test_debug_shows_the_export_cause_in_the_traceback(files, monkeypatch):
    r = _run(["--debug", "convert", str(files["unexp"]), "--factory", "two_input_model:unexportable", "--no-bench"], monkeypatch, files)
    assert r.exit_code == 2
    assert "The above exception was the direct cause" in r.stderr  # not hidden by `from None`


def test_validate_with_an_input_shape_the_onnx_does_not_take_is_exit_2(files, monkeypatch, tmp_path):
    fused = tmp_path / "two.onnx"
    r = _run(["convert", str(files["two"]), "--factory", "two_input_model:module_only", "--input", "input_ids:int64:2x6", "--input", "decoder_input_ids:int64:2x6", "-o", str(fused), "--no-bench", "--no-validate"], monkeypatch)
    assert r.exit_code == 0, r.output
    r = _run(["validate", str(files["two"]), str(fused), "--factory", "two_input_model:module_only", "--input", "input_ids:int64:2x6", "--input", "decoder_input_ids:float32:2x6"], monkeypatch)
    assert "decoder_input_ids" in assert_user_error(r)


def test_help_and_version_are_exit_0(monkeypatch):
    for args in ([], ["--help"], ["--version"], ["convert", "--help"]):
        r = _run(args, monkeypatch)
        assert r.exit_code == 0, (args, r.output)
        assert "error:" not in r.output


def test_exported_archive_given_a_wrong_dtype_is_exit_2(monkeypatch, tmp_path):
    out = tmp_path / "never.onnx"
    r = _run(["convert", str(HERE.parent / "models" / "tinyllama.pt"), "--no-bench", "--no-validate", "--input", "input_ids:float32:2x8", "-o", str(out)], monkeypatch)
    assert not out.exists()
    assert "cannot run on inputs" in assert_user_error(r)


def test_first_line_of_any_exception_text():
    """The one helper that puts an exception into a one-line message: no IndexError on empty
    or blank text, the first non-blank line, capped."""
    from normexport.errors import first_line

    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(RuntimeError("\n  \n")) == "RuntimeError"
    assert first_line(ValueError("\n  bad shape  \nsecond line")) == "bad shape"
    assert first_line(ValueError("x" * 500), 40) == "x" * 40
    assert first_line("") == "" and first_line("  \n b") == "b"
