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
from normexport.fuse.registry import FUSED_OPS, RECORDS, TARGETS, target_record
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


# ---------------------------------------------------------------------------------------------
# Extension: a new target or backend is a record (plus its lowering or runner); nothing else names one

REGISTRY_MODULES = {"normexport/fuse/registry.py", "normexport/runners/__init__.py"}


def _names_outside_registries() -> list[str]:
    """String constants that name a target or a backend, or an onnxruntime execution provider,
    outside the registry modules. ``onnx`` is also the kind of an output file (normexport.outputs'
    kinds, ``Output(..., "onnx")``, a report's ``"kind"``) and transformers' exporter's name
    (``apply_patches("onnx")``): those uses are not a target."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    names = set(TARGETS) | set(BACKENDS)
    found = []
    for path in sorted((root / "normexport").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in REGISTRY_MODULES:
            continue
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("Output", "apply_patches"):
                allowed |= {id(a) for a in node.args}
            if isinstance(node, ast.Dict):
                allowed |= {id(v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "kind"}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in allowed:
                continue
            if rel == "normexport/outputs.py" and node.value == "onnx":
                continue  # the file kinds
            if node.value in names or "ExecutionProvider" in node.value:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    return found


def test_nothing_outside_the_registries_names_a_target_backend_or_provider():
    assert _names_outside_registries() == []


def _new_target(**kw):
    from normexport.fuse.registry import Ref, Target

    return Target("new-target", ("NewNorm",), "NewNorm", Ref("normexport.fuse.targets", "lower_ort"), "a target for the test", **kw)


def test_a_target_no_backend_runs_is_exit_2_not_a_crash(tmp_path):
    """A new target with a residual op that no backend names: auto asks a backend and finds
    none (the user's error, not StopIteration); convert refuses it before loading anything."""
    from normexport import pipeline
    from normexport.options import ConvertOptions, FuseOptions
    from normexport.runners import backends_running

    target = _new_target(folds_residual=True, portable=False)
    with pytest.raises(NormexportError, match="no backend runs target new-target"):
        backends_running(target)
    with pytest.raises(NormexportError, match="no backend runs target new-target"):
        residual_layout("auto", DEFAULT_BACKEND, target)
    assert residual_layout("on", DEFAULT_BACKEND, target)[0] is True  # a layout given outright needs no backend
    missing = tmp_path / "never-read.pt"
    with pytest.raises(NormexportError, match="no backend runs target new-target"):
        pipeline.convert(missing, ConvertOptions(fuse=FuseOptions(target=target)))


def test_stress_and_inspect_read_norms_off_the_plain_target_not_the_first():
    """The target stress and inspect fuse with is the record that says it is plain (standard
    signature, no opset change), wherever it stands in the list."""
    from normexport.fuse.registry import PLAIN_TARGET

    assert PLAIN_TARGET.plain and PLAIN_TARGET.opset is None and PLAIN_TARGET.ops
    model, feed = build(variant(residual=True), seed=5)
    m = ir.serde.deserialize_model(model)
    fuse_model(m, PLAIN_TARGET, residual=False)
    node = next(n for n in m.graph if n.op_type == PLAIN_TARGET.ops[0])
    assert {"epsilon", "axis"} <= set(node.attributes)


def test_a_new_backend_is_one_record(tmp_path):
    """A backend record built outside the registry's list runs through make_onnx_runner, the
    residual choice and the option objects, as the listed ones do."""
    from normexport.options import ValidateOptions
    from normexport.runners import Backend, make_onnx_runner
    from normexport.runners.base import Runner

    class EchoRunner(Runner):  # runs the model through onnxruntime's CPU provider, named as its record
        def __init__(self, record, model):
            self.record, self.model, self.name = record, model, record.name

        def activate(self):
            self.session = ort.InferenceSession(str(self.model), providers=list(backend_record(DEFAULT_BACKEND).providers))

        @property
        def output_names(self):
            return [o.name for o in self.session.get_outputs()]

        def infer(self, feed):
            names = {i.name for i in self.session.get_inputs()}
            return dict(zip(self.output_names, self.session.run(None, {k: v for k, v in feed.items() if k in names})))

    record = Backend("echo", lambda rec, model, optimize, threads, dtype, **kw: EchoRunner(rec, model), "a backend for the test",
                     fold_residual=False, residual_why="the test says so")
    assert ValidateOptions(backend=record).record is record
    fold, why = residual_layout("auto", record, "ort")
    assert fold is False and "echo" in why and "the test says so" in why
    model, feed = build(variant(residual=True), seed=7)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with make_onnx_runner(path, record) as r:
        got = r.infer(feed)[r.output_names[0]].astype(np.float64)
    ref = reference(variant(residual=True), model, feed)
    np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max(), rtol=2e-5)
