"""Comparison numbers against hand-computed values, and localisation of a deliberately
perturbed norm (exit 1, the report names it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import own_model
from normexport.cli import main
from normexport.validate import compare_arrays, compare_outputs

HERE = Path(__file__).parent


def test_compare_numbers_and_minimal_tolerances():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 8)).astype(np.float32)
    got = ref.copy()
    got[1, 2] += 0.01
    got[3, 5] -= 0.002
    c = compare_arrays("y", ref, got, atol=1e-4, rtol=1e-3)
    r64, g64 = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(g64 - r64)
    assert c.max_abs == pytest.approx(diff.max())
    assert c.max_rel == pytest.approx((diff / np.abs(r64)).max())
    assert c.mean_abs == pytest.approx(diff.mean())
    assert c.cosine == pytest.approx(float((r64 * g64).sum() / np.linalg.norm(r64) / np.linalg.norm(g64)))
    assert not c.passed and c.worst_index == [1, 2]
    # the minimal tolerances are exact: they pass, and a hair less fails
    assert compare_arrays("y", ref, got, atol=c.min_atol * 1.0001, rtol=1e-3).passed
    assert not compare_arrays("y", ref, got, atol=c.min_atol * 0.999, rtol=1e-3).passed
    assert compare_arrays("y", ref, got, atol=1e-4, rtol=c.min_rtol * 1.0001).passed
    assert not compare_arrays("y", ref, got, atol=1e-4, rtol=c.min_rtol * 0.999).passed


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["ref", "got", "both"])
def test_nan_or_inf_on_either_side_fails_and_says_where(bad, where):
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((3, 4, 5)).astype(np.float32)
    got = ref.copy()
    for arr in ((ref,) if where == "ref" else (got,) if where == "got" else (ref, got)):
        arr[1, 2, 3] = bad
        arr[2, 0, 0] = bad
    c = compare_arrays("logits", ref, got, atol=1e9, rtol=1e9)
    assert not c.passed
    assert c.worst_index == [1, 2, 3]  # the first bad element in C order
    side = "ONNX" if where == "got" else "PyTorch"
    assert f"on the {side} side at index [1, 2, 3]" in c.problem
    assert ("NaN" if np.isnan(bad) else "Inf") in c.problem
    assert c.nonfinite_mismatch == (4 if where == "both" else 2)


def test_all_nan_outputs_fail():
    nan = np.full((2, 8), np.nan, np.float32)
    assert not compare_arrays("y", nan, nan.copy()).passed


def test_empty_comparison_fails():
    e = np.zeros((2, 0, 4), np.float32)
    c = compare_arrays("y", e, e.copy())
    assert not c.passed and "no elements" in c.problem
    assert not compare_outputs({}, {"y": np.ones(3, np.float32)})[0].passed


def test_output_count_mismatch_fails_on_the_unpaired_output():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((4,))
    res = compare_outputs({"output_0": a, "output_1": b}, {"logits": a.copy()})
    assert [r.passed for r in res] == [True, False]
    assert "PyTorch returns 2 output(s), ONNX 1" in res[1].problem and "PyTorch only" in res[1].name


def test_shape_mismatch_fails_with_both_shapes():
    c = compare_arrays("y", np.ones((2, 3)), np.ones((3, 2)))
    assert not c.passed and "[2, 3]" in c.problem and "[3, 2]" in c.problem


def test_per_output_tolerances_apply_by_name():
    rng = np.random.default_rng(3)
    ref = {"o0": rng.standard_normal((8,)), "o1": rng.standard_normal((8,))}
    got = {"a": ref["o0"] + 1e-3, "b": ref["o1"] + 1e-3}
    # default atol 1e-4 fails both; a per-output atol of 2e-3 passes only "b"
    res = compare_outputs(ref, got, atol={None: 1e-4, "b": 2e-3}, rtol=0.0)
    assert [(r.name, r.passed, r.atol) for r in res] == [("a", False, 1e-4), ("b", True, 2e-3)]
    # a per-output value alone leaves the other output at its dtype default (float64: 1e-7)
    res = compare_outputs(ref, got, atol={"a": 2e-3}, rtol={"a": 0.0})
    assert res[0].passed and not res[1].passed and res[1].atol == 1e-7


def test_perturbed_norm_fails_with_exit_1_and_is_named(tmp_path, monkeypatch):
    m, ex = own_model.factory()
    sd = tmp_path / "own.pt"
    torch.save(m.state_dict(), sd)
    fused = tmp_path / "fused.onnx"
    runner = CliRunner()
    monkeypatch.chdir(HERE)
    r = runner.invoke(main, ["convert", str(sd), "--factory", "own_model:factory", "-o", str(fused), "--no-bench"], catch_exceptions=False)
    assert r.exit_code == 0, r.output + r.stderr
    model = onnx.load(str(fused))
    norm_nodes = [n for n in model.graph.node if n.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")]
    assert len(norm_nodes) == own_model.NUM_NORMS
    victim = 2  # the third norm in graph order: blocks.1.norm1
    scale_name = norm_nodes[victim].input[2 if norm_nodes[victim].op_type.startswith("Skip") else 1]
    inits = {i.name: i for i in model.graph.initializer}
    arr = numpy_helper.to_array(inits[scale_name]).copy()
    arr[: len(arr) // 2] *= 1.5
    inits[scale_name].CopyFrom(numpy_helper.from_array(arr, scale_name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    rep = tmp_path / "v.json"
    r = runner.invoke(main, ["validate", str(sd), str(bad), "--factory", "own_model:factory", "--report", str(rep)], catch_exceptions=False)
    assert r.exit_code == 1, r.output
    report = json.loads(rep.read_text())["validation"]
    assert report["passed"] is False
    first = report["first_divergent_norm"]
    assert first["module"] == "blocks.1.norm1" and first["index"] == victim
    assert all(n["passed"] for n in report["norms"][:victim])
    assert "blocks.1.norm1" in r.output
    # and the unperturbed model passes the same command
    r = runner.invoke(main, ["validate", str(sd), str(fused), "--factory", "own_model:factory"], catch_exceptions=False)
    assert r.exit_code == 0, r.output


def _fused_own(tmp_path, monkeypatch):
    m, _ = own_model.factory()
    sd = tmp_path / "own.pt"
    torch.save(m.state_dict(), sd)
    fused = tmp_path / "fused.onnx"
    monkeypatch.chdir(HERE)
    r = CliRunner().invoke(main, ["convert", str(sd), "--factory", "own_model:factory", "-o", str(fused), "--no-bench", "--no-validate"])
    assert r.exit_code == 0, r.output
    return sd, fused


def test_validate_output_count_mismatch_is_a_named_failure(tmp_path, monkeypatch):
    sd, fused = _fused_own(tmp_path, monkeypatch)
    model = onnx.load(str(fused))
    extra = next(n for n in model.graph.node if n.op_type.endswith("SimplifiedLayerNormalization")).output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(extra, onnx.TensorProto.FLOAT, None))
    two = tmp_path / "two_outputs.onnx"
    onnx.save(model, str(two))
    rep = tmp_path / "v.json"
    r = CliRunner().invoke(main, ["validate", str(sd), str(two), "--factory", "own_model:factory", "--report", str(rep)])
    assert r.exit_code == 1, r.output
    outs = json.loads(rep.read_text())["validation"]["outputs"]
    unpaired = [o for o in outs if not o["passed"]]
    assert len(unpaired) == 1 and "PyTorch returns 1 output(s), ONNX 2" in unpaired[0]["problem"]
    assert "ONNX only" in unpaired[0]["name"] and "PyTorch returns 1 output(s), ONNX 2" in r.stdout
    assert [o["passed"] for o in outs if o is not unpaired[0]] == [True]


def test_validate_nan_in_the_fused_model_fails_and_says_where(tmp_path, monkeypatch):
    sd, fused = _fused_own(tmp_path, monkeypatch)
    model = onnx.load(str(fused))
    out = model.graph.output[0].name
    producer = next(n for n in model.graph.node if out in n.output)
    producer.output[list(producer.output).index(out)] = out + "_pre"
    nan = numpy_helper.from_array(np.array(np.nan, np.float32), "nan_const")
    model.graph.initializer.append(nan)
    model.graph.node.append(onnx.helper.make_node("Mul", [out + "_pre", "nan_const"], [out]))
    bad = tmp_path / "nan.onnx"
    onnx.save(model, str(bad))
    rep = tmp_path / "v.json"
    r = CliRunner().invoke(main, ["validate", str(sd), str(bad), "--factory", "own_model:factory", "--report", str(rep)])
    assert r.exit_code == 1, r.output
    o = json.loads(rep.read_text())["validation"]["outputs"][0]
    assert not o["passed"] and o["problem"].startswith("NaN on the ONNX side at index [0, 0, 0]")


def test_per_output_tolerance_from_the_command_line(tmp_path, monkeypatch):
    sd, fused = _fused_own(tmp_path, monkeypatch)
    name = onnx.load(str(fused)).graph.output[0].name
    rep = tmp_path / "v.json"
    r = CliRunner().invoke(main, ["validate", str(sd), str(fused), "--factory", "own_model:factory", "--atol", "1e-3", "--atol", f"{name}=0", "--rtol", f"{name}=0", "--report", str(rep)])
    o = json.loads(rep.read_text())["validation"]["outputs"][0]
    assert (o["atol"], o["rtol"]) == (0.0, 0.0)
    # zero tolerance passes only where fused and PyTorch agree bit for bit
    assert (r.exit_code == 0) == (o["max_abs"] == 0.0), r.output


def test_json_reports_carry_no_terminal_colour_codes(tmp_path):
    from normexport.report import write_json

    path = tmp_path / "r.json"
    write_json({"notes": ["export failed (\x1b[96mThis is step 1/3\x1b[0m)"], "nested": {"a": ["\x1b[1mbold\x1b[0m"]}}, path)
    text = path.read_text()
    assert "\x1b" not in text and "\\u001b" not in text
    data = json.loads(text)
    data.pop("normexport")  # the marker every report carries
    assert data == {"notes": ["export failed (This is step 1/3)"], "nested": {"a": ["bold"]}}
