"""The target and backend registries: what each record says is what the code does."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from normexport.cli import main
from normexport.errors import NormexportError
from normexport.fuse import fuse_model
from normexport.fuse.registry import FUSED_OPS, RECORDS, target_record
from normexport.runners import BACKEND_RECORDS, BACKENDS, DEFAULT_BACKEND, backend_record, residual_layout
from rms_graphs import build, reference, variant


def _fused_ops(target: str, residual: bool, fold: bool) -> tuple[set[str], onnx.ModelProto, dict]:
    model, feed = build(variant(residual=residual), seed=3)
    m = ir.serde.deserialize_model(model)
    report = fuse_model(m, target, residual=fold)
    assert report.fused == 1
    proto = ir.serde.serialize_model(m)
    return {n.op_type for n in proto.graph.node}, proto, feed


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_record_ops_are_what_its_lowering_emits(record):
    seen = set()
    for residual in (False, True):
        ops, _, _ = _fused_ops(record.name, residual, fold=True)
        seen |= ops & FUSED_OPS
    assert seen == set(record.ops)


def test_fused_ops_are_the_union_of_the_records():
    assert FUSED_OPS == {op for r in RECORDS for op in r.ops}
    with pytest.raises(NormexportError):
        target_record("no-such-target")


@pytest.mark.parametrize("name", BACKENDS)
def test_auto_follows_the_backend_record(name):
    record = backend_record(name)
    fold, why = residual_layout("auto", name, "ort")
    assert fold == record.fold_residual
    assert name in why and record.residual_why in why
    assert residual_layout("off", name, "ort")[0] is False
    assert residual_layout("on", name, "ort")[0] is True
    assert residual_layout("on", name, "decompose")[0] is False  # no op that takes the Add in


def test_plugin_target_runs_only_where_a_backend_names_it():
    runners = [b.name for b in BACKEND_RECORDS if b.runs("trt-plugin")]
    assert runners and all("trt-plugin" in backend_record(b).plugin_targets for b in runners)
    assert all(b.runs("ort") and b.runs("onnx") for b in BACKEND_RECORDS)
    assert not backend_record(DEFAULT_BACKEND).fold_residual  # onnxruntime's CPU: Add + norm is faster
    # auto for a target the chosen backend cannot run: the layout of a backend that runs it
    runner = backend_record(runners[0])
    assert residual_layout("auto", DEFAULT_BACKEND, "trt-plugin")[0] == runner.fold_residual


def _run(model: onnx.ModelProto, feed):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feed.items() if k in names})


@pytest.mark.parametrize("flags, folded", [([], True), (["--residual-fusion"], True), (["--residual-fusion", "off"], False),
                                           (["--no-residual-fusion"], False), (["--residual-fusion", "on"], True)])
def test_fuse_residual_flags(tmp_path, flags, folded):
    model, feed = build(variant(residual=True), seed=11)
    src, out = tmp_path / "m.onnx", tmp_path / "m.fused.onnx"
    onnx.save(model, src)
    result = CliRunner().invoke(main, ["fuse", str(src), "-o", str(out), *flags], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    fused = onnx.load(out)
    ops = {n.op_type for n in fused.graph.node}
    assert ("SkipSimplifiedLayerNormalization" in ops) == folded and ("Add" in ops) != folded
    ref = reference(variant(residual=True), model, feed)
    got = _run(fused, feed)[0].astype(np.float64)
    np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max(), rtol=2e-5)


def test_contradicting_residual_flags_are_a_usage_error(tmp_path):
    model, _ = build(variant(residual=True), seed=1)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    result = CliRunner().invoke(main, ["fuse", str(src), "--residual-fusion", "on", "--no-residual-fusion"])
    assert result.exit_code == 2
    assert not (tmp_path / "m.ort.onnx").exists()
