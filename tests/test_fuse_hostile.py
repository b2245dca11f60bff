"""Fusion on hostile input: graphs that already use the names the fusion generates, models
much larger than their norms, forms torch's exporter fuses itself at opset 23, and ONNX files
that must not be read (cycles, external data outside the model's folder or missing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ort_helper
from normexport.cli import main
from normexport.errors import NormexportError
from normexport.fuse import fuse_file, fuse_model, load_onnx
from normexport.fuse.registry import FUSED_OPS
from rms_graphs import Spelling, build, reference, variant

ROOT = Path(__file__).resolve().parents[1]


run = ort_helper.run


def fuse(model: onnx.ModelProto, target: str = "ort"):
    m = ir.serde.deserialize_model(model)
    report = fuse_model(m, target)
    return ir.serde.serialize_model(m), report


def assert_names_unique(model: onnx.ModelProto) -> None:
    g = model.graph
    produced = [o for n in g.node for o in n.output if o]
    defined = [i.name for i in g.input] + [i.name for i in g.initializer if i.name not in {x.name for x in g.input}] + produced
    assert len(defined) == len(set(defined)), sorted(n for n in defined if defined.count(n) > 1)
    assert not {i.name for i in g.initializer} & {i.name for i in g.input}, "an initializer shadows a graph input"
    names = [n.name for n in g.node if n.name]
    assert len(names) == len(set(names))


# ---------------------------------------------------------------------------------------------
# Names


def rename(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a value (input, initializer, intermediate or output) or a node everywhere."""
    g = model.graph
    for n in g.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
        if n.name == old:
            n.name = new
    for coll in (g.input, g.output, g.initializer, g.value_info):
        for v in coll:
            if v.name == old:
                v.name = new


def generated_names(model: onnx.ModelProto, target: str) -> list[str]:
    """The value and node names a fusion of ``model`` creates."""
    fused, _ = fuse(model, target)
    before = {n.name for n in model.graph.node} | {v for n in model.graph.node for v in [*n.input, *n.output]}
    after = {n.name for n in fused.graph.node} | {v for n in fused.graph.node for v in [*n.input, *n.output]}
    return sorted(x for x in after - before if x)


def assert_fused_matches(sp: Spelling, model, feed, ref, target: str, renamed_feed=None):
    feed = renamed_feed or feed
    before = run(model, feed)
    fused, report = fuse(model, target)
    assert report.fused == 1, report.skipped
    if target == "onnx":  # the checker knows no onnxruntime op (SimplifiedLayerNormalization)
        onnx.checker.check_model(fused, full_check=True)
    assert_names_unique(fused)
    after = run(fused, feed)
    tol = 2e-3 if sp.dtype == TensorProto.FLOAT16 else 2e-5
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(after[0].astype(np.float64), ref, rtol=tol, atol=tol * scale)
    for b, a in zip(before, after):  # every output as onnxruntime computes the original
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=tol, atol=tol * scale)


spellings = st.builds(
    Spelling,
    shape=st.sampled_from([(2, 5, 16), (3, 8), (1, 2, 3, 12)]),
    dtype=st.sampled_from([TensorProto.FLOAT, TensorProto.FLOAT16]),
    compute_fp32=st.just(True),
    inverse=st.sampled_from(["div", "reciprocal", "pow"]),
    weight=st.sampled_from(["none", "after", "gemma"]),
    bias=st.booleans(),
    residual=st.booleans(),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sp=spellings, target=st.sampled_from(["ort", "onnx", "decompose"]), data=st.data())
def test_property_names_the_fusion_generates_already_in_the_graph(sp, target, data):
    """Inputs, initializers, intermediate values and nodes renamed to the names the fusion
    would generate: the fused model still computes the reference and what the original does."""
    model, feed = build(sp, seed=data.draw(st.integers(0, 2**16)))
    ref = reference(sp, model, feed)  # computed before renaming: it reads the weights by name
    taken = generated_names(model, "onnx" if target == "decompose" else target)
    if target == "decompose":
        model, _ = fuse(model, "onnx")
    g = model.graph
    candidates = [("input", i.name) for i in g.input] + [("initializer", i.name) for i in g.initializer]
    candidates += [("value", o) for n in g.node for o in n.output if o not in {x.name for x in g.output}]
    candidates += [("node", n.name) for n in g.node if n.name]
    picks = data.draw(st.lists(st.tuples(st.sampled_from(candidates), st.sampled_from(taken)), min_size=1, max_size=6, unique_by=lambda p: p[1]))
    feed = dict(feed)
    used = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output} | {n.name for n in g.node}
    for (kind, old), new in picks:
        if new in used or old not in used:
            continue  # one renaming per name: a valid graph stays valid
        rename(model, old, new)
        used = (used - {old}) | {new}
        if kind == "input" and old in feed:
            feed[new] = feed.pop(old)
    assert_fused_matches(sp, model, feed, ref, target)


def test_graph_input_named_like_the_generated_ones_scale_is_not_shadowed():
    """A weightless norm gets an all-ones scale initializer; a graph input that already has
    that name must keep feeding its own consumer, and the norm must keep its ones."""
    sp = variant(weight="none")
    model, _ = build(sp)
    g = model.graph
    g.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [16]))
    g.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [16]))
    g.node.append(helper.make_node("Relu", ["extra"], ["z"], name="user_relu"))
    ones = [n for n in generated_names(model, "ort") if "ones_scale" in n]
    assert len(ones) == 1, generated_names(model, "ort")
    rename(model, "extra", ones[0])
    rng = np.random.default_rng(12345)
    feed = {"x": rng.standard_normal((2, 5, 16)).astype(np.float32) * 3, ones[0]: rng.standard_normal(16).astype(np.float32) * 5}
    expected = run(model, feed)
    fused, report = fuse(model, "ort")
    assert report.fused == 1
    assert_names_unique(fused)
    assert ones[0] in {i.name for i in fused.graph.input}
    x = feed["x"].astype(np.float64)
    ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + sp.eps)
    out = run(fused, feed)
    np.testing.assert_allclose(out[0].astype(np.float64), ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(out, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_names_used_only_inside_a_subgraph_are_not_reused():
    """A value defined inside an If branch carries the name the fusion would give the ones
    scale: the new initializer (visible in the branch's scope) must not take it."""
    sp = variant(weight="none")
    model, _ = build(sp)
    g = model.graph
    g.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    g.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [16]))
    ones = [n for n in generated_names(model, "ort") if "ones_scale" in n]
    assert len(ones) == 1

    def branch(k: float) -> onnx.GraphProto:
        c = numpy_helper.from_array(np.full(16, k, np.float32), f"c{int(k)}")
        nodes = [helper.make_node("Constant", [], [ones[0]], value=c, name=f"const_{int(k)}"),
                 helper.make_node("Neg", [ones[0]], [f"out_{int(k)}"], name=f"neg_{int(k)}")]
        return helper.make_graph(nodes, f"branch{int(k)}", [], [helper.make_tensor_value_info(f"out_{int(k)}", TensorProto.FLOAT, [16])])

    g.node.append(helper.make_node("If", ["cond"], ["z"], name="user_if", then_branch=branch(2.0), else_branch=branch(3.0)))
    rng = np.random.default_rng(99)
    feed = {"x": rng.standard_normal((2, 5, 16)).astype(np.float32) * 3, "cond": np.array(True)}
    expected = run(model, feed)
    fused, report = fuse(model, "ort")
    assert report.fused == 1
    assert ones[0] not in {i.name for i in fused.graph.initializer}
    for a, b in zip(run(fused, feed), expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Memory

MEMORY_CHILD = r"""
import json, sys
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
from normexport.fuse import fuse_model, load_onnx, save_onnx
import onnx, onnxruntime  # noqa: F401
if sys.argv[1] == "baseline":
    print(json.dumps({"peak": hwm()})); sys.exit(0)
m = load_onnx(sys.argv[1])
r = fuse_model(m, "ort")
save_onnx(m, sys.argv[2])
print(json.dumps({"peak": hwm(), "fused": r.fused}))
"""


def _child(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _norm_chain(nodes, x, tag, weight):
    def op(t, ins, **kw):
        out = f"{tag}_{t.lower()}_{len(nodes)}"
        nodes.append(helper.make_node(t, ins, [out], name=f"n_{out}", **kw))
        return out
    inv = op("Reciprocal", [op("Sqrt", [op("Add", [op("ReduceMean", [op("Pow", [x, "two"]), "axes"], keepdims=1), "eps"])])])
    return op("Mul", [weight, op("Mul", [x, inv])]), op


def decoder_like(layers: int, hidden: int) -> onnx.ModelProto:
    """Norms and MatMuls with big weights: (layers x hidden x 4 hidden) fp32 of MatMul weights."""
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 16) * 0.02).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    nodes, x = [], "x"
    for i in range(layers):
        w = numpy_helper.from_array((1 + block[:hidden]).copy(), f"norm{i}.weight")
        up = numpy_helper.from_array(np.tile(block, -(-hidden * 4 * hidden // block.size))[: hidden * 4 * hidden].reshape(hidden, 4 * hidden), f"up{i}")
        down = numpy_helper.from_array(np.ascontiguousarray(np.tile(block, -(-hidden * 4 * hidden // block.size))[: hidden * 4 * hidden].reshape(4 * hidden, hidden)), f"down{i}")
        inits += [w, up, down]
        n, op = _norm_chain(nodes, x, f"l{i}", w.name)
        x = op("Add", [x, op("MatMul", [op("Relu", [op("MatMul", [n, up.name])]), down.name])])
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


MEMORY_SLACK = 64 << 20  # the graph's structure, protobuf and allocator overheads, page-granular accounting


def test_peak_memory_of_load_fuse_save_is_under_twice_the_model(tmp_path):
    """A ~200 MB inline model: the child's peak minus the same child's baseline (interpreter
    and libraries imported, nothing loaded) stays under 2x the model + 64 MB. Reading an inline
    protobuf needs its bytes and the parsed message at once (2x); fusing and saving add no
    copy of the weights."""
    model = decoder_like(layers=6, hidden=1024)
    src, dst = tmp_path / "m.onnx", tmp_path / "out" / "m.fused.onnx"
    onnx.save_model(model, str(src))
    del model
    size = src.stat().st_size
    assert size > 150 << 20
    fused = _child(src, dst)
    base = _child("baseline")
    assert fused["fused"] == 6
    assert fused["peak"] - base["peak"] < 2 * size + MEMORY_SLACK, (fused["peak"] >> 20, base["peak"] >> 20, size >> 20)
    assert dst.stat().st_size < size * 1.01


def test_weightless_exporter_norm_with_external_data_adds_no_activation_sized_scale(tmp_path):
    """RMSNormalization(x, ConstantOfShape(Shape(x))) -- torch's opset-23 form of a norm
    without weight -- next to a 16 MB weight, in external data: the fused model's data is the
    source's size (the scale is ones of the normalized shape), and it computes the same."""
    t, h = 1024, 4096
    w = (np.random.default_rng(1).standard_normal((t, h)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Add", ["x", "w"], ["s"], name="add"),
        helper.make_node("Shape", ["s"], ["shape"], name="shape"),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], name="ones", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("RMSNormalization", ["s", "ones"], ["y"], name="norm", axis=-1, epsilon=1e-6, stash_type=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, h])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    src_bytes = sum(p.stat().st_size for p in src.parent.iterdir())
    for target in ("ort", "onnx"):
        dst = tmp_path / target / "m.onnx"
        report = fuse_file(src, dst, target)
        assert report.fused == 1
        out_bytes = sum(p.stat().st_size for p in dst.parent.iterdir())
        assert out_bytes < src_bytes + 64 * 1024, (out_bytes, src_bytes)
        x = np.random.default_rng(7).standard_normal((1, t, h)).astype(np.float32)
        s = x.astype(np.float64) + w
        ref = s / np.sqrt((s * s).mean(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(run(dst, {"x": x})[0].astype(np.float64), ref, rtol=1e-4, atol=1e-4)


def test_weightless_norm_over_a_large_normalized_shape_stores_no_ones(tmp_path):
    """A norm without weight over 1100 x 1000 elements: the fused op's ones come from a
    ConstantOfShape at run time, not from 4.4 MB of stored ones."""
    sp = variant(weight="none", shape=(2, 1100, 1000), n_axes=2)
    model, feed = build(sp)
    ref = reference(sp, model, feed)
    for target in ("ort", "onnx"):
        fused, report = fuse(model, target)
        assert report.fused == 1
        assert sum(numpy_helper.to_array(i).size for i in fused.graph.initializer) < 1024
        assert [n.op_type for n in fused.graph.node].count("ConstantOfShape") == 1
        np.testing.assert_allclose(run(fused, feed)[0].astype(np.float64), ref, rtol=2e-5, atol=2e-4)


def test_shape_inference_failure_is_reported_and_changes_nothing(monkeypatch, capfd):
    """ONNX shape inference raising: where no check needed an inferred shape the fusion is
    the same and the report says inference failed; where one did, fusing fails (exit 2)
    instead of quietly fusing less."""
    import onnx.shape_inference

    sp = variant(weight="none", shape=(2, 5, 16))
    model, feed = build(sp)
    expected, report_ok = fuse(model, "ort")
    assert not any("shape inference" in n for n in report_ok.notes)

    weighted, _ = build(variant(weight="after"))  # absorbing the weight needs the norm's inferred shape
    fused, report = fuse(weighted, "ort")  # with inference: the weight is absorbed
    assert [n.op_type for n in fused.graph.node] == ["SimplifiedLayerNormalization"] and not report.notes

    def broken(*a, **k):
        raise RuntimeError("forced failure")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    fused, report = fuse(model, "ort")
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in expected.graph.node]
    assert report.fused == report_ok.fused == 1
    assert any("shape inference failed" in n and "forced failure" in n for n in report.notes), report.notes
    np.testing.assert_array_equal(run(fused, feed)[0], run(expected, feed)[0])

    with pytest.raises(NormexportError, match="shape inference failed"):
        fuse(weighted, "ort")
    assert "Traceback" not in capfd.readouterr().err


def test_strict_shape_inference_failure_falls_back_to_non_strict_and_says_so(monkeypatch):
    import onnx.shape_inference

    real = onnx.shape_inference.infer_shapes

    def strict_fails(proto, *a, strict_mode=False, **k):
        if strict_mode:
            raise RuntimeError("forced strict failure")
        return real(proto, *a, strict_mode=False, **k)

    sp = variant(weight="after")
    model, feed = build(sp)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", strict_fails)
    fused, report = fuse(model, "ort")
    assert [n.op_type for n in fused.graph.node] == ["SimplifiedLayerNormalization"]
    assert any("strict mode" in n and "forced strict failure" in n for n in report.notes), report.notes
    np.testing.assert_allclose(run(fused, feed)[0].astype(np.float64), reference(sp, model, feed), rtol=2e-5, atol=2e-4)


def test_external_data_model_prints_no_shape_inference_traceback(tmp_path):
    """The CLI in a child process (no test logging capture): nothing on stderr but the result."""
    sp = variant(shape=(2, 4, 1024))
    model, feed = build(sp)
    ref = reference(sp, model, feed)  # before saving: the save moves the weights out of ``model``
    src = tmp_path / "m.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", "from normexport.cli import main; main()", "fuse", str(src), "-o", str(tmp_path / "out.onnx")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Shape inference failed" not in out.stderr + out.stdout and "Traceback" not in out.stderr, out.stderr
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feed)[0].astype(np.float64), ref, rtol=2e-5, atol=2e-4)


# ---------------------------------------------------------------------------------------------
# Forms torch's exporter fuses itself at opset 23


def _torch_forms():
    import torch
    import torch.nn.functional as F

    class Weightless(torch.nn.Module):
        def forward(self, x):
            return F.rms_norm(x, (16,))

    class ScaleAlongTokens(torch.nn.Module):
        """x * rsqrt(mean(x^2) + eps) * w, w broadcasting along the token axis: the exporter's
        optimizer fuses it into RMSNormalization(x, w) with w of shape [T, 1] or [T, H]."""

        def __init__(self, shape):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(*shape) * 0.3 + 1)

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w

    return {
        "weightless-static": (Weightless(), None),
        "weightless-dynamic": (Weightless(), ({0: "batch", 1: "tokens"},)),
        "scale-T-by-1": (ScaleAlongTokens((5, 1)), None),
        "scale-T-by-H": (ScaleAlongTokens((5, 16)), None),
    }


@pytest.fixture(scope="module")
def exported_forms(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    out = {}
    folder = tmp_path_factory.mktemp("opset23")
    for name, (module, dynamic) in _torch_forms().items():
        path = folder / f"{name}.onnx"
        module.eval()
        torch.onnx.export(module, (torch.randn(2, 5, 16),), str(path), dynamo=True, opset_version=23, dynamic_shapes=dynamic)
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert "RMSNormalization" in ops, ops  # the form under test: fused by the exporter
        out[name] = (module, path)
    return out


@pytest.mark.parametrize("target", ["ort", "onnx", "trt-plugin", "decompose"])
@pytest.mark.parametrize("form", ["weightless-static", "weightless-dynamic", "scale-T-by-1", "scale-T-by-H"])
def test_exporter_opset23_rmsnormalization_forms_retarget(exported_forms, form, target, tmp_path):
    import torch

    module, src = exported_forms[form]
    dst = tmp_path / "fused.onnx"
    report = fuse_file(src, dst, target)
    assert report.fused == 1
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    along_tokens = form.startswith("scale")
    if target == "decompose":
        assert not set(ops) & FUSED_OPS
    else:
        assert sum(op in FUSED_OPS for op in ops) == 1
        # a scale that varies along tokens stays a Mul after the norm; a constant one is absorbed
        assert ops.count("Mul") == (1 if along_tokens else 0), ops
        assert "ConstantOfShape" not in ops
        assert len(ops) == 1 + along_tokens, ops
    if target == "trt-plugin":
        return  # only TensorRT runs the plugin node
    shape = (3, 7, 16) if form == "weightless-dynamic" else (2, 5, 16)
    for seed in (1, 2):
        x = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3)
        with torch.no_grad():
            want = module(x).double().numpy()
        np.testing.assert_allclose(run(dst, {"x": x.numpy()})[0].astype(np.float64), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Files that must not be read


def _external_model(folder: Path, location: str) -> Path:
    """A norm whose weight is external data at ``location`` (64 bytes from offset 0)."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[16])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "64")):
        e = w.external_data.add()
        e.key, e.value = k, v
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1, epsilon=1e-6)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _assert_exit2(path: Path, *words):
    out = path.parent / "out.onnx"
    result = CliRunner().invoke(main, ["fuse", str(path), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "hardlink"])
def test_external_data_outside_the_model_folder_is_refused_unread(tmp_path, monkeypatch, how):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(16, dtype=np.float32).tobytes())
    if how == "dotdot":
        path = _external_model(tmp_path / "model", "../secret.bin")
    elif how == "absolute":
        path = _external_model(tmp_path / "model", str(secret))
    else:
        path = _external_model(tmp_path / "model", "w.bin")
        if how == "symlink":
            (tmp_path / "model" / "w.bin").symlink_to(secret)
        else:
            os.link(secret, tmp_path / "model" / "w.bin")
    opened = []
    real_open = open

    def watching_open(file, *a, **k):
        opened.append(os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", watching_open)
    _assert_exit2(path, "hard links" if how == "hardlink" else "outside the model's folder", "not read")
    assert str(secret.resolve()) not in opened


def test_missing_external_data_is_named(tmp_path):
    path = _external_model(tmp_path / "model", "weights.bin")
    _assert_exit2(path, "weights.bin", "missing")


def test_graph_with_a_cycle_is_refused_naming_a_node(tmp_path):
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="first_add"),
        helper.make_node("Relu", ["a"], ["b"], name="loop_relu"),
        helper.make_node("Relu", ["a"], ["y"], name="out_relu"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "cycle.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    with pytest.raises(NormexportError, match="graph has a cycle .*(first_add|loop_relu)"):
        load_onnx(path)
    _assert_exit2(path, "graph has a cycle")
