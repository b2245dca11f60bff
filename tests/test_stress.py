"""The per-norm stress check: each fused norm alone on large-magnitude, tiny and zero rows
against a float64 RMSNorm; fails and names a norm that overflows, and one whose fusion
changed the maths; passes on correct fp16 and fp32 fusions (hand-built, shipped, zoo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import ort_helper
from normexport.fuse import fuse_model, save_onnx
from normexport.options import ValidateOptions
from normexport.fuse.registry import FUSED_OPS
from normexport.stress import LARGE_MAGNITUDES, NormParams, reference, row_kinds, stress_check, stress_rows, wanted
from rms_graphs import IR_VERSION, build, variant

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (2, 8, 64)


def _write(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def _fused(unfused: onnx.ModelProto, path: Path, target: str = "ort") -> Path:
    model = ir.serde.deserialize_model(unfused)
    report = fuse_model(model, target)
    assert report.fused == 1
    save_onnx(model, path)
    return path


def test_reference_is_torch_rms_norm_in_float64():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 32)) * 50
    g, b = rng.standard_normal(32), rng.standard_normal(32)
    got = reference({"x": x}, NormParams(1e-5, -1, g, b))
    want = torch.nn.functional.rms_norm(torch.from_numpy(x), (32,), torch.from_numpy(g), eps=1e-5) + torch.from_numpy(b)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)
    # two inputs (a folded residual) normalize their sum
    a = rng.standard_normal((3, 5, 32))
    np.testing.assert_allclose(reference({"a": a, "b": x - a}, NormParams(1e-5, -1, g, b)), got, rtol=1e-9, atol=1e-9)


def test_fp16_rows_reach_overflowing_squares_tiny_and_zero_rows():
    x, kinds = stress_rows([2, 64, 16], -1, "float16", np.random.default_rng(0))
    rows = x.reshape(128, 16)
    assert set(kinds) == set(row_kinds("float16"))
    peaks = {k: np.abs(rows[np.array(kinds) == k]).max(axis=1) for k in set(kinds)}
    for m in LARGE_MAGNITUDES["float16"]:
        np.testing.assert_allclose(peaks[f"max |x| {m:g}"], m)
        assert m**2 > float(np.finfo(np.float16).max) >= m
    assert np.all(peaks["zero"] == 0) and np.allclose(peaks["tiny"], 1e-4)
    assert 0.5 < peaks["ordinary"].mean() < 5


@pytest.mark.parametrize(
    "name, sp",
    [
        ("fp16-llama", variant(shape=SHAPE, dtype=TensorProto.FLOAT16, compute_fp32=True, eps=1e-5)),
        ("fp16-bias", variant(shape=SHAPE, dtype=TensorProto.FLOAT16, compute_fp32=True, bias=True)),
        ("fp32-residual", variant(shape=SHAPE, residual=True)),
        ("fp32-gemma", variant(shape=SHAPE, weight="gemma", inverse="div")),
    ],
)
def test_correct_fusion_passes_against_float64_and_unfused(tmp_path, name, sp):
    unfused, _ = build(sp, seed=7)
    fused = _fused(unfused, tmp_path / "fused.onnx")
    report = stress_check(fused, _write(unfused, tmp_path / "unfused.onnx"), ValidateOptions(stress=True))
    assert report.passed and not report.not_checked and len(report.norms) == 1
    n = report.norms[0]
    assert n.epsilon == pytest.approx(sp.eps, rel=1e-6)
    assert n.max_input == pytest.approx(max(LARGE_MAGNITUDES[n.dtype]), rel=1e-2)
    assert n.vs_reference.passed and n.vs_reference.nonfinite_mismatch == 0
    assert n.vs_unfused is not None and n.vs_unfused.passed and n.unfused_matches_reference
    # The fused model, run here on the large rows by itself, equals torch's float64 rms_norm.
    big = np.full(SHAPE, 0.5) * np.sign(np.random.default_rng(1).standard_normal(SHAPE)) * 250.0
    feed = {"a": (big / 2).astype(np.float32), "b": (big / 2).astype(np.float32)} if sp.residual else {"x": big.astype(np.float16 if sp.dtype == TensorProto.FLOAT16 else np.float32)}
    y = ort_helper.session(fused).run(["y"], feed)[0]
    assert np.all(np.isfinite(y)) and np.abs(y).max() > 0.1


def _overflowing_fp16_norm(eps: float, gamma: np.ndarray, module: str) -> onnx.ModelProto:
    """A "fused" norm that rounds x² to fp16 (as a kernel squaring in fp16 does): Inf from
    |x| >= 256 on, so the mean is Inf and the row comes out as zeros."""
    def node(op, ins, out, **attrs):
        n = helper.make_node(op, ins, [out], name=f"broken/{op}_{out}", **attrs)
        n.metadata_props.add(key="normexport.pattern", value="hand-built fp16 square")
        return n

    nodes = [
        node("Cast", ["x"], "xf", to=TensorProto.FLOAT),
        node("Mul", ["xf", "xf"], "sq32"),
        node("Cast", ["sq32"], "sq16", to=TensorProto.FLOAT16),
        node("Cast", ["sq16"], "sq", to=TensorProto.FLOAT),
        node("ReduceMean", ["sq", "axes"], "ms", keepdims=1),
        node("Add", ["ms", "eps"], "var"),
        node("Sqrt", ["var"], "rms"),
        node("Div", ["xf", "rms"], "normed"),
        node("Cast", ["normed"], "back", to=TensorProto.FLOAT16),
        node("Mul", ["back", "w"], "y"),
    ]
    nodes[-1].metadata_props.add(key="normexport.role", value="norm-output")
    nodes[-1].metadata_props.add(key="normexport.module", value=module)
    graph = helper.make_graph(
        nodes, "broken", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, SHAPE)], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, SHAPE)],
        [numpy_helper.from_array(np.array([-1], np.int64), "axes"), numpy_helper.from_array(np.array(eps, np.float32), "eps"), numpy_helper.from_array(gamma.astype(np.float16), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = IR_VERSION
    return model


def test_norm_whose_squares_overflow_fp16_fails_and_is_named(tmp_path):
    sp = variant(shape=SHAPE, dtype=TensorProto.FLOAT16, compute_fp32=True, eps=1e-5)
    unfused, _ = build(sp, seed=2)
    gamma = numpy_helper.to_array(next(i for i in unfused.graph.initializer if i.name == "w")).astype(np.float64)
    broken = _write(_overflowing_fp16_norm(sp.eps, gamma, "layers.3.input_layernorm"), tmp_path / "broken.onnx")
    report = stress_check(broken, _write(unfused, tmp_path / "unfused.onnx"), ValidateOptions())
    assert not report.passed
    [n] = report.failed
    assert n.module == "layers.3.input_layernorm" and n.node == "y"
    # exactly the rows whose squares pass 65504 fail; ordinary, tiny and zero rows agree
    assert n.failed_rows == [f"max |x| {m:g} (zeros)" for m in LARGE_MAGNITUDES["float16"]]
    assert n.vs_unfused is not None and n.vs_unfused.passed and n.unfused_matches_reference
    assert n.vs_reference.max_abs > 0.5  # zeros where the reference is O(1)
    data = report.to_json()
    assert data["failed"] == ["layers.3.input_layernorm"] and data["passed"] is False
    json.dumps(data)


def test_fused_scale_perturbed_fails_against_the_unfused_subgraph(tmp_path):
    unfused, _ = build(variant(shape=SHAPE), seed=5)
    fused = _fused(unfused, tmp_path / "fused.onnx")
    model = ir.load(str(fused))
    [node] = [n for n in model.graph if n.op_type == "SimplifiedLayerNormalization"]
    scale = node.inputs[1]
    scale.const_value = ir.tensor(scale.const_value.numpy() * 1.25, name=scale.name)
    ir.save(model, str(tmp_path / "perturbed.onnx"))
    unfused_path = _write(unfused, tmp_path / "unfused.onnx")
    report = stress_check(tmp_path / "perturbed.onnx", unfused_path, ValidateOptions(stress=True))
    [n] = report.failed
    assert "differs from the unfused subgraph" in n.failed_rows
    assert n.vs_reference.passed  # the kernel computes what its weights say: only the comparison with the original catches it
    assert stress_check(fused, unfused_path, ValidateOptions(stress=True)).passed


def test_stress_is_on_by_default_for_fp16_norms_only(tmp_path):
    fp16 = _fused(build(variant(shape=SHAPE, dtype=TensorProto.FLOAT16, compute_fp32=True))[0], tmp_path / "fp16.onnx")
    fp32 = _fused(build(variant(shape=SHAPE))[0], tmp_path / "fp32.onnx")
    assert wanted(None, None, fp16) and not wanted(None, None, fp32)
    assert wanted(None, "float16", fp32) and wanted(True, None, fp32) and not wanted(False, None, fp16)


@pytest.fixture(scope="module")
def shipped_export(tmp_path_factory):
    from normexport.export import export_onnx
    from normexport.load import load_model, make_inputs

    tmp = tmp_path_factory.mktemp("stress_shipped")
    loaded = load_model(ROOT / "models" / "tinyllama.pt")
    exp = export_onnx(loaded, make_inputs(loaded.require_specs(), 0))
    save_onnx(exp.model, tmp / "unfused.onnx")
    return tmp


@pytest.mark.parametrize("target", ["ort", "decompose"])
def test_shipped_model_fused_norms_pass_and_a_perturbed_one_is_named(shipped_export, target):
    tmp = shipped_export
    unfused = tmp / "unfused.onnx"
    model = ir.load(str(unfused))
    fuse_model(model, target)
    fused = tmp / f"{target}.onnx"
    save_onnx(model, fused)
    report = stress_check(fused, unfused, ValidateOptions(stress=True))
    assert report.passed and len(report.norms) == 9 and not report.not_checked
    assert [n.module for n in report.norms][:2] == ["layers.0.input_norm", "layers.0.post_attn_norm"]
    for n in report.norms:
        assert n.vs_reference.max_rel < 1e-5 and n.vs_unfused.max_abs < 1e-5 and n.epsilon == pytest.approx(1e-6)
    gamma = model.graph.initializers["layers.2.input_norm.gamma"]
    gamma.const_value = ir.tensor(gamma.const_value.numpy() * 1.5, name=gamma.name)
    save_onnx(model, tmp / "perturbed.onnx")
    bad = stress_check(tmp / "perturbed.onnx", unfused, ValidateOptions(stress=True))
    assert [n.module for n in bad.failed] == ["layers.2.input_norm"]


def _convert(*args):
    from click.testing import CliRunner

    from normexport.cli import main

    return CliRunner().invoke(main, ["convert", *map(str, args)], catch_exceptions=False)


def test_convert_decompose_shipped_model_validates_and_stresses(tmp_path):
    out, rep = tmp_path / "decomposed.onnx", tmp_path / "report.json"
    result = _convert(ROOT / "models" / "tinyllama.pt", "--target", "decompose", "-o", out, "--report", rep, "--no-bench", "--stress")
    assert result.exit_code == 0, result.output
    report = json.loads(rep.read_text())
    assert report["fusion"]["fused"] == 9 and report["fusion"]["ops"] == {"primitive ops": 9}
    v = report["validation"]
    assert v["passed"] and all(o["max_abs"] < 1e-4 for o in v["outputs"])
    assert v["stress"]["passed"] and v["stress"]["checked"] == 9
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert not ops & FUSED_OPS
    assert "ReduceMean" in ops


@pytest.mark.slow
def test_convert_fp16_zoo_model_stresses_every_norm_by_default(tmp_path):
    from models import zoo

    state = tmp_path / "llama.pt"
    torch.save(zoo.factory("llama")[0].state_dict(), state)
    rep = tmp_path / "report.json"
    result = _convert(state, "--factory", "models.zoo:llama", "--dtype", "float16", "-o", tmp_path / "out.onnx", "--report", rep, "--no-bench")
    assert result.exit_code == 0, result.output
    stress = json.loads(rep.read_text())["validation"]["stress"]
    assert stress is not None and stress["passed"] and stress["checked"] == zoo.ZOO["llama"].num_norms
    for n in stress["norms"]:
        assert n["dtype"] == "float16" and n["max_input"] == pytest.approx(3e4, rel=1e-2)
        assert n["vs_reference"]["nonfinite_mismatch"] == 0 and n["vs_unfused"]["passed"]
    assert "Stress: each fused norm alone" in result.output


def test_fused_op_written_by_another_tool_is_stressed(tmp_path):
    """A SimplifiedLayerNormalization with no normexport metadata (another tool's fusion)."""
    sp = variant(shape=SHAPE, dtype=TensorProto.FLOAT16, compute_fp32=True, eps=1e-5)
    unfused, _ = build(sp, seed=4)
    w = next(i for i in unfused.graph.initializer if i.name == "w")
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], name="other_tool_norm", axis=-1, epsilon=1e-5, stash_type=1)
    graph = helper.make_graph([node], "other", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, SHAPE)], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, SHAPE)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = IR_VERSION
    report = stress_check(_write(model, tmp_path / "other.onnx"), _write(unfused, tmp_path / "unfused.onnx"), ValidateOptions())
    [n] = report.norms
    assert report.passed and n.node == "y" and n.module == "" and n.op == "SimplifiedLayerNormalization"
    assert n.vs_unfused.passed and n.epsilon == pytest.approx(1e-5)
