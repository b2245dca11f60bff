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
from normexport.validate import compare_arrays

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


def test_nan_or_inf_where_reference_has_none_always_fails():
    ref = np.ones((3, 3), np.float32)
    for bad in (np.nan, np.inf):
        got = ref.copy()
        got[0, 0] = bad
        c = compare_arrays("y", ref, got, atol=1e9, rtol=1e9)
        assert not c.passed and c.nonfinite_mismatch == 1
    both = ref.copy()
    both[2, 2] = np.nan
    assert compare_arrays("y", both, both.copy()).passed  # the same NaN on both sides agrees


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
