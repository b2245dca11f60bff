"""Fusion on hand-built graphs: every spelling fuses into one node and computes the float64
reference; every near-miss is left alone, with its reason, computing what it did."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

import ort_helper
from normexport.fuse import fuse_model
from normexport.fuse.registry import FUSED_OPS
from rms_graphs import Spelling, build, reference, variant



run = ort_helper.run  # onnxruntime's optimizer off: no fusions of its own


def fuse(model: onnx.ModelProto, target: str):
    m = ir.serde.deserialize_model(model)
    report = fuse_model(m, target)
    return ir.serde.serialize_model(m), report


def tol(sp: Spelling) -> float:
    return 2e-3 if sp.dtype == TensorProto.FLOAT16 else 2e-5


def assert_fused_equal(sp: Spelling, target: str, seed: int = 0):
    model, feed = build(sp, seed)
    ref = reference(sp, model, feed)
    before = run(model, feed)
    fused, report = fuse(model, target)
    ops = [n.op_type for n in fused.graph.node]
    assert report.fused == 1, (report.skipped, ops)
    assert sum(op in FUSED_OPS for op in ops) == 1, ops
    assert not {"ReduceMean", "Sqrt", "Reciprocal"} & set(ops), ops
    after = run(fused, feed)
    scale = np.abs(ref).max()
    # The original spelling computes the reference too (the builder and reference agree) ...
    np.testing.assert_allclose(before[0].astype(np.float64), ref, atol=tol(sp) * scale, rtol=tol(sp))
    # ... and so does the fused model, on every output (the residual sum included).
    np.testing.assert_allclose(after[0].astype(np.float64), ref, atol=tol(sp) * scale, rtol=tol(sp))
    assert after[0].dtype == before[0].dtype and after[0].shape == before[0].shape
    for b, a in zip(before[1:], after[1:]):
        np.testing.assert_array_equal(a, b)
    return fused, report


SPELLINGS = {
    "dynamo-fp32": variant(),
    "torchscript-div1": variant(inverse="div1", axes_input=False),
    "div": variant(inverse="div"),
    "pow-neg-half": variant(inverse="pow"),
    "mul-square": variant(square="mul"),
    "swapped-operands": variant(swap_mul=True, swap_add=True, swap_weight=True),
    "positive-axis": variant(positive_axis=True),
    "llama-fp16": variant(dtype=TensorProto.FLOAT16, compute_fp32=True, weight="after"),
    "olmo2-fp16-weight-before-cast": variant(dtype=TensorProto.FLOAT16, compute_fp32=True, weight="before"),
    "gemma-fp16-one-plus-w": variant(dtype=TensorProto.FLOAT16, compute_fp32=True, weight="gemma"),
    "no-weight": variant(weight="none"),
    "bias": variant(bias=True),
    "padded-weight": variant(weight_shape="padded"),
    "per-head-rank4": variant(shape=(2, 3, 5, 8)),
    "rank2": variant(shape=(6, 32)),
    "two-trailing-axes": variant(shape=(2, 3, 4, 8), n_axes=2),
    "eps-1e-12": variant(eps=1e-12),
    "eps-1e-2": variant(eps=1e-2),
    "residual": variant(residual=True),
    "cast-shared-with-residual": variant(dtype=TensorProto.FLOAT16, compute_fp32=True, shared_cast=True),
    "attr-axes-fp16": variant(axes_input=False, dtype=TensorProto.FLOAT16, compute_fp32=True),
}


@pytest.mark.parametrize("target", ["ort", "onnx", "decompose"])
@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_fuses_and_matches_reference(name, target):
    sp = SPELLINGS[name]
    if target == "decompose":
        # decompose un-fuses: fuse for onnx first, then decompose must give primitive ops back
        model, feed = build(sp)
        fused, _ = fuse(model, "onnx")
        back, report = fuse(fused, "decompose")
        ops = {n.op_type for n in back.graph.node}
        assert not ops & FUSED_OPS and "ReduceMean" in ops
        np.testing.assert_allclose(run(back, feed)[0].astype(np.float64), reference(sp, model, feed), rtol=tol(sp), atol=tol(sp) * 10)
        return
    fused, report = assert_fused_equal(sp, target)
    if target == "onnx":
        onnx.checker.check_model(fused, full_check=True)
        assert {o.domain: o.version for o in fused.opset_import}[""] >= 23


def test_residual_becomes_skip_simplified_layernorm_and_keeps_the_sum():
    fused, report = assert_fused_equal(variant(residual=True), "ort")
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("SkipSimplifiedLayerNormalization") == 1 and "Add" not in ops
    assert report.fused_norms[0].residual


@pytest.mark.parametrize("sum_read", [True, False])
def test_skip_norm_writes_unread_outputs_absent(sum_read, tmp_path):
    """The folded op's mean and inverse std, and its residual sum where nothing reads it, are
    written absent (onnxruntime computes and allocates every output present), also after a pass
    that names every value (onnxscript's rewriter runs one); y and the sum stay as they were."""
    import onnx_ir.passes.common as common_passes

    from normexport.fuse import save_onnx

    sp = variant(residual=True)
    model, feed = build(sp)
    if not sum_read:
        model.graph.output.pop()  # the sum x is no longer a graph output: only the norm reads it
    m = ir.serde.deserialize_model(model)
    assert fuse_model(m, "ort").fused == 1
    common_passes.NameFixPass()(m)
    save_onnx(m, tmp_path / "f.onnx")
    fused = onnx.load(str(tmp_path / "f.onnx"))
    (skip,) = [n for n in fused.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    present = [bool(o) for o in skip.output] + [False] * (4 - len(skip.output))
    assert present == [True, False, False, sum_read], list(skip.output)
    outs = run(fused, feed)
    np.testing.assert_allclose(outs[0].astype(np.float64), reference(sp, model, feed), rtol=tol(sp), atol=tol(sp) * 10)
    if sum_read:
        np.testing.assert_allclose(outs[1], feed["a"] + feed["b"], rtol=1e-6, atol=1e-6)


def test_fp16_squares_that_overflow_stay_finite_after_fusion():
    sp = variant(dtype=TensorProto.FLOAT16, compute_fp32=False, weight="after")  # the model squares in fp16
    model, feed = build(sp)
    feed["x"] = (feed["x"].astype(np.float32) * 150).astype(np.float16)  # squares ~ 9e4 > 65504
    fused, report = fuse(model, "ort")
    assert report.fused == 1
    out = run(fused, feed)[0]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.astype(np.float64), reference(sp, model, feed), rtol=5e-3, atol=5e-3 * 3)


NEAR_MISSES = {
    # keepdims=0 makes a valid graph only where [T] broadcasts against [T, H]: T == H
    "keepdims0": (variant(keepdims0=True, shape=(16, 16)), "keepdims=0"),
    "eps-not-constant": (variant(eps_input=True), "eps is not a constant"),
    "mean-square-has-other-consumer": (variant(extra_consumer=True), "another consumer"),
    "layernorm": (variant(layernorm=True), "LayerNorm"),
    "cube": (variant(exponent=3.0), "exponent other than 2"),
    "pow-quarter": (variant(inverse="pow", inverse_exponent=-0.25), "other than -0.5"),
    "mean-over-axis-minus-2": (variant(wrong_axis=True), "not the last dims"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_is_left_alone_with_reason(name):
    sp, reason = NEAR_MISSES[name]
    model, feed = build(sp)
    before = run(model, feed)
    fused, report = fuse(model, "ort")
    assert report.fused == 0
    assert not {n.op_type for n in fused.graph.node} & FUSED_OPS
    assert len(fused.graph.node) == len(model.graph.node)
    assert any(reason in s.reason for s in report.skipped), report.skipped
    for b, a in zip(before, run(fused, feed)):
        np.testing.assert_array_equal(a, b)


def test_scale_varying_along_unnormalized_dim_stays_unfused_mul():
    sp = variant(weight_shape="bad")
    model, feed = build(sp)
    before = run(model, feed)
    fused, report = fuse(model, "ort")
    # The core norm is fused; the Mul by a [T, 1] "scale" is not a norm scale and stays.
    ops = [n.op_type for n in fused.graph.node]
    assert report.fused == 1 and "Mul" in ops and not report.fused_norms[0].scale
    np.testing.assert_allclose(run(fused, feed)[0], before[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["ort", "onnx", "trt-plugin"])
def test_fusing_twice_equals_fusing_once(target):
    model, _ = build(variant(residual=True, dtype=TensorProto.FLOAT16, compute_fp32=True) if target == "onnx" else variant(residual=True))
    once, r1 = fuse(model, target)
    twice, r2 = fuse(once, target)
    assert [n.op_type for n in once.graph.node] == [n.op_type for n in twice.graph.node]
    assert r2.newly_fused == 0 and r2.fused == r1.fused == 1


def test_trt_plugin_node_carries_parser_attributes():
    model, _ = build(variant(shape=(2, 3, 4, 8), n_axes=2, bias=True))
    fused, report = fuse(model, "trt-plugin")
    nodes = [n for n in fused.graph.node if n.op_type == "RMSNorm"]
    assert len(nodes) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b""
    assert attrs["epsilon"] == pytest.approx(1e-6) and attrs["has_bias"] == 1 and attrs["has_residual"] == 0
    assert len(nodes[0].input) == 3  # x, gamma, bias
    init = {i.name: i for i in fused.graph.initializer}
    gamma = init[nodes[0].input[1]]
    assert list(gamma.dims) == [32]  # two trailing dims flattened for the plugin


def test_exporter_fp16_gemma_rmsnormalization_with_fp32_scale_is_repaired():
    """torch 2.13 writes RMSNormalization(x: fp16, scale: fp32) at opset 23, which onnxruntime
    refuses to load; the fusion gives X and scale one dtype."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (1 + 0.1 * rng.standard_normal(16)).astype(np.float32)
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1, epsilon=1e-6, stash_type=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, (2, 16))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2, 16))], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    with pytest.raises(Exception, match="bound to different types"):  # onnxruntime's Fail: a type error on load
        run(model, {"x": np.zeros((2, 16), np.float16)})
    x = rng.standard_normal((2, 16)).astype(np.float16)
    for target in ("onnx", "ort"):
        fused, report = fuse(model, target)
        out = run(fused, {"x": x})[0]
        x64 = x.astype(np.float64)
        ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=5e-3, atol=5e-3)


# ---------------------------------------------------------------------------------------------
# Property-based: random spellings fuse and compute the reference; random near-misses don't.

spellings = st.builds(
    Spelling,
    shape=st.sampled_from([(2, 5, 16), (3, 8), (1, 2, 3, 12), (4, 1, 24)]),
    dtype=st.sampled_from([TensorProto.FLOAT, TensorProto.FLOAT16]),
    compute_fp32=st.booleans(),
    square=st.sampled_from(["pow", "mul"]),
    inverse=st.sampled_from(["div", "reciprocal", "div1", "pow"]),
    swap_mul=st.booleans(),
    swap_add=st.booleans(),
    axes_input=st.booleans(),
    positive_axis=st.booleans(),
    eps=st.sampled_from([1e-12, 1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]),
    weight=st.sampled_from(["none", "after", "before", "gemma"]),
    swap_weight=st.booleans(),
    weight_shape=st.sampled_from(["vector", "padded"]),
    bias=st.booleans(),
    residual=st.booleans(),
)


def _valid(sp: Spelling) -> Spelling:
    if sp.dtype == TensorProto.FLOAT16 and not sp.compute_fp32 and sp.weight in ("before", "gemma"):
        sp = variant(**{**sp.__dict__, "weight": "after"})
    return sp


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sp=spellings, target=st.sampled_from(["ort", "onnx"]), seed=st.integers(0, 2**16))
def test_property_any_spelling_fuses_to_the_reference(sp, target, seed):
    assert_fused_equal(_valid(sp), target, seed)


near_miss_flags = st.sampled_from(["keepdims0", "eps_input", "extra_consumer", "layernorm", "exponent", "inverse_exponent", "wrong_axis"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sp=spellings, flag=near_miss_flags, seed=st.integers(0, 2**16))
def test_property_near_miss_is_never_fused(sp, flag, seed):
    sp = _valid(sp)
    extra = {"exponent": {"exponent": 3.0, "square": "pow"}, "inverse_exponent": {"inverse": "pow", "inverse_exponent": -0.25}}.get(flag, {flag: True})
    sp = variant(**{**sp.__dict__, **extra, "residual": False})
    if flag == "keepdims0":
        sp = variant(**{**sp.__dict__, "shape": (16, 16), "weight_shape": "vector"})
    model, feed = build(sp, seed)
    before = run(model, feed)
    fused, report = fuse(model, "ort")
    assert report.fused == 0 and report.skipped
    assert not {n.op_type for n in fused.graph.node} & FUSED_OPS
    for b, a in zip(before, run(fused, feed)):
        np.testing.assert_array_equal(a, b)


def test_scale_computed_from_constants_is_folded():
    sp = variant(dtype=TensorProto.FLOAT16, compute_fp32=True, weight="gemma")
    fused, report = assert_fused_equal(sp, "ort")
    ops = [n.op_type for n in fused.graph.node]
    assert ops == ["SimplifiedLayerNormalization"], ops  # the Add(w, 1) became an initializer


def test_external_data_save_is_atomic_and_loads(tmp_path):
    from normexport.fuse import load_onnx, save_onnx

    sp = variant(shape=(2, 4, 1024))  # weights above onnx-ir's inline-size threshold
    model, feed = build(sp)
    m = ir.serde.deserialize_model(model)
    fuse_model(m, "ort")
    out = tmp_path / "big.onnx"
    save_onnx(m, out, external=True)
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no temp leftovers
    sess = ort_helper.session(out, optimize=True)
    np.testing.assert_allclose(sess.run(None, feed)[0].astype(np.float64), reference(sp, model, feed), rtol=2e-5, atol=2e-4)
    again = load_onnx(out)  # external data read back through the loader
    assert sum(1 for n in again.graph if n.op_type == "SimplifiedLayerNormalization") == 1


def test_model_with_external_data_saved_elsewhere_carries_its_weights(tmp_path):
    """A model read with external data and written (inline) to another folder must not point
    at the source's .data file."""
    from normexport.fuse import fuse_file

    sp = variant(shape=(2, 4, 1024))
    model, feed = build(sp)
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    ref = reference(sp, model, feed)
    onnx.save_model(model, str(src_dir / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    fuse_file(src_dir / "m.onnx", dst_dir / "fused.onnx", "ort")
    (src_dir / "m.onnx.data").unlink()  # the source's weights are gone: the copy must stand alone
    sess = ort_helper.session(dst_dir / "fused.onnx", optimize=True)
    np.testing.assert_allclose(sess.run(None, feed)[0].astype(np.float64), ref, rtol=2e-5, atol=2e-4)
