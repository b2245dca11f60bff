"""The Python API: convert a module in memory, fuse ONNX models given three ways, validate and
assert_onnx_matches on a good and a perturbed model, errors as NormexportError, and the
README's pytest example run as written."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

import normexport
import ort_helper
from normexport.errors import NormexportError
from normexport.testing import assert_onnx_matches
from rms_graphs import Spelling, build, reference

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SHAPE = 1000, (2, 12)
NORMS = 5  # 2 blocks x 2 + final
PERTURBED = "blocks.1.norm2"


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(d, eps=1e-6)
        self.attn = nn.Linear(d, d)
        self.norm2 = nn.RMSNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    m = TinyLM()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m.eval()


def token_ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    module = tiny_lm()
    out = tmp_path_factory.mktemp("api") / "tiny.onnx"
    result = normexport.convert(module, {"input_ids": token_ids(1)}, output=out)
    return module, result


def perturbed_copy(path: Path, norm: str, dst: Path) -> Path:
    """The fused model with one element of one norm's weight changed."""
    proto = onnx.load(path)
    (init,) = [i for i in proto.graph.initializer if i.name == f"{norm}.weight"]
    w = onnx.numpy_helper.to_array(init).copy()
    w[3] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    onnx.save(proto, dst)
    return dst


def test_convert_module_in_memory_writes_a_model_matching_float64_pytorch(converted):
    module, result = converted
    assert result.output is not None and result.output.is_file()
    assert result.passed and result.validation.passed
    assert result.fusion.fused == NORMS
    report = result.to_json()
    assert report["output"] == str(result.output) and report["fusion"]["fused"] == NORMS
    assert report["inputs"][0]["high"] == VOCAB  # draws span the whole embedding
    ops = {n.op_type for n in onnx.load(result.output).graph.node}
    assert "SimplifiedLayerNormalization" in ops and "ReduceMean" not in ops
    ref_module = copy.deepcopy(module).double()
    for seed in (101, 102, 103):  # fresh ids, never the example's
        ids = token_ids(seed)
        assert int(ids.max()) > VOCAB // 2
        with torch.no_grad():
            ref = ref_module(ids).numpy()
        (got,) = ort_helper.run(result.output, {"input_ids": ids.numpy()})
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)


def test_fuse_takes_a_path_a_model_proto_and_an_ir_model(tmp_path):
    sp = Spelling()
    proto, feed = build(sp)
    ref = reference(sp, proto, feed)
    path = tmp_path / "norm.onnx"
    onnx.save(proto, path)

    from_path, report = normexport.fuse(path, target="ort")
    assert isinstance(from_path, ir.Model) and report.fused == 1
    from_proto, report = normexport.fuse(proto, target="ort")
    assert isinstance(from_proto, onnx.ModelProto) and report.fused == 1
    given = ir.serde.deserialize_model(proto)
    from_ir, report = normexport.fuse(given, target="onnx")
    assert from_ir is given and report.fused == 1
    assert "ReduceMean" in {n.op_type for n in proto.graph.node}  # the caller's proto is untouched
    for model in (ir.serde.serialize_model(from_path), from_proto):
        assert "SimplifiedLayerNormalization" in {n.op_type for n in model.graph.node}
        (got,) = ort_helper.run(model, feed)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_validate_passes_on_the_good_model_and_names_the_perturbed_norm(converted, tmp_path):
    module, result = converted
    inputs = {"input_ids": token_ids(7)}
    good = normexport.validate(module, result.output, inputs)
    assert good.passed and good.outputs and all(c.passed for c in good.outputs)
    assert good.first_divergence is None

    bad = normexport.validate(module, perturbed_copy(result.output, PERTURBED, tmp_path / "bad.onnx"), inputs)
    assert bad.passed is False
    assert bad.first_divergence is not None and bad.first_divergence.module == PERTURBED
    assert len(bad.norms) == NORMS and all(n.passed for n in bad.norms[: bad.first_divergence.index])


def test_assert_onnx_matches_passes_on_the_good_model_and_fails_with_the_table(converted, tmp_path):
    module, result = converted
    inputs = {"input_ids": token_ids(8)}
    assert_onnx_matches(module, result.output, inputs)
    bad = onnx.load(perturbed_copy(result.output, PERTURBED, tmp_path / "bad.onnx"))
    with pytest.raises(AssertionError) as info:
        assert_onnx_matches(module, bad, inputs)  # an in-memory ModelProto
    text = str(info.value)
    assert f"first diverging norm: #3 {PERTURBED}" in text
    assert re.search(r"max abs .* cosine", text) and "NO" in text  # the per-output table's failing row


def test_convert_binds_inputs_by_name_and_refuses_unknown_names(tmp_path):
    with pytest.raises(NormexportError, match="not an input of the model"):
        normexport.convert(tiny_lm(), {"ids": token_ids(1)}, output=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "call",
    [
        lambda tmp: normexport.convert(tiny_lm(), None, output=tmp / "m.onnx"),
        lambda tmp: normexport.convert(tiny_lm(), {"input_ids": token_ids(1)}),
        lambda tmp: normexport.convert(tmp / "missing.pt", output=tmp / "m.onnx"),
        lambda tmp: normexport.convert(tiny_lm(), {"input_ids": token_ids(1)}, output=tmp / "m.onnx", target="tensorflow"),
        lambda tmp: normexport.fuse(tmp / "missing.onnx"),
        lambda tmp: normexport.fuse(b"not a model"),
        lambda tmp: normexport.validate(tiny_lm(), tmp / "missing.onnx", {"input_ids": token_ids(1)}),
        lambda tmp: normexport.validate(tiny_lm(), tmp / "missing.onnx", [token_ids(1)]),
    ],
    ids=["no-inputs", "no-output", "missing-model", "unknown-target", "fuse-missing", "fuse-bytes", "validate-missing", "inputs-list"],
)
def test_user_errors_raise_normexport_errors(tmp_path, call):
    with pytest.raises(NormexportError) as info:
        call(tmp_path)
    assert info.value.message and info.value.hint
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_fuse_refuses_a_model_without_rmsnorm_unless_allowed():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    proto = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]), opset_imports=[onnx.helper.make_opsetid("", 18)])
    with pytest.raises(NormexportError, match="no RMSNorm found"):
        normexport.fuse(proto)
    model, report = normexport.fuse(proto, allow_none=True)
    assert report.fused == 0 and [n.op_type for n in model.graph.node] == ["Relu"]


@pytest.mark.parametrize("residual", ["maybe", "yes", None, 1])
def test_fuse_refuses_an_unknown_residual_choice(residual, tmp_path):
    """api.fuse and fuse_file take True / False / auto / on / off; anything else is refused
    before the model is read, and fuse_file writes nothing."""
    from normexport.fuse import fuse_file

    with pytest.raises(NormexportError, match="unknown residual choice"):
        normexport.fuse(tmp_path / "absent.onnx", residual=residual)
    with pytest.raises(NormexportError, match="unknown residual choice"):
        fuse_file(tmp_path / "absent.onnx", tmp_path / "out.onnx", residual=residual)
    assert not (tmp_path / "out.onnx").exists()


def test_import_normexport_loads_neither_torch_nor_onnx():
    code = "import sys, normexport; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'click', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def readme_test_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## In your tests", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's 'In your tests' section has one python block"
    return blocks[0]


def test_readme_pytest_example_runs_and_passes(tmp_path):
    (tmp_path / "test_readme_example.py").write_text(readme_test_example())
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b1 passed\b", proc.stdout), proc.stdout[-2000:]


def test_bench_times_the_three_variants(converted):
    module, result = converted
    report = normexport.bench(module, result.output, {"input_ids": token_ids(9)}, warmup=1, iters=3, threads=1)
    assert set(report.latency_ms) == {"torch", "onnx_unfused", "onnx_fused"}
    assert all(lat.iters == 3 and 0 < lat.min <= lat.median for lat in report.latency_ms.values())
    assert 0 < report.norm_share["onnx_fused"] < 1


def test_ln2rms_converts_a_pre_ln_model_to_an_equivalent_rmsnorm_one():
    from models.gpt2_style import gpt2_small

    model, example = gpt2_small()
    converted_model, report = normexport.ln2rms(model, example)
    assert report.passed and not any(isinstance(m, nn.LayerNorm) for m in converted_model.modules())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(77))
    with torch.no_grad():
        ref, got = model.double()(ids), copy.deepcopy(converted_model).double()(ids)
    ref, got = (getattr(t, "logits", t) for t in (ref, got))
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6


def test_cli_exit_code_is_1_for_every_failed_validation_and_0_otherwise():
    from normexport.bench import BenchReport
    from normexport.cli import exit_code
    from normexport.hf.convert import HFConvertReport
    from normexport.pipeline import ConvertReport
    from normexport.validate import ValidationReport, compare_arrays

    ok = compare_arrays("y", np.ones(3), np.ones(3))
    off = compare_arrays("y", np.ones(3), np.full(3, 2.0))
    assert ok.passed and not off.passed

    def validation(c):
        return ValidationReport(passed=c.passed, samples=1, outputs=[c], unfused=[])

    assert [exit_code(validation(c)) for c in (ok, off)] == [0, 1]
    assert [exit_code(ConvertReport("m", "ort", "o", validation=validation(c))) for c in (ok, off)] == [0, 1]
    assert exit_code(ConvertReport("m", "ort", "o")) == 0  # not validated
    assert [exit_code(HFConvertReport("m", "ort", "o", outputs=[c])) for c in (ok, off)] == [0, 1]
    assert exit_code(BenchReport(threads=1, warmup=0, iters=1, input_sets=1)) == 0
    assert exit_code(None) == 0


def _with_static_inputs(path: Path, dst: Path, shape=SHAPE) -> Path:
    """The model with its input's dims fixed (normexport's exports keep batch and sequence dynamic)."""
    proto = onnx.load(path)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for d, n in zip(dims, shape):
        d.ClearField("dim_param")
        d.dim_value = n
    onnx.save(proto, dst)
    return dst


def test_assert_onnx_matches_without_inputs_draws_from_the_onnx_signature(converted, tmp_path):
    """No inputs given: the draws come from the ONNX model's input signature (ids across the
    whole embedding), and they are real draws: the perturbed norm is found by them."""
    module, result = converted
    static = _with_static_inputs(result.output, tmp_path / "static.onnx")
    report = normexport.validate(module, static)
    assert report.passed and report.outputs and report.samples == 2
    assert_onnx_matches(module, static)
    bad = _with_static_inputs(perturbed_copy(result.output, PERTURBED, tmp_path / "bad.onnx"), tmp_path / "bad_static.onnx")
    with pytest.raises(AssertionError, match=f"first diverging norm: #3 {PERTURBED}"):
        assert_onnx_matches(module, bad)
    from normexport import api

    loaded, specs = api.load(module, onnx_path=static)
    assert [(s.name, s.dtype, s.shape, s.low, s.high) for s in specs] == [("input_ids", "int64", SHAPE, 0.0, float(VOCAB))]


def test_assert_onnx_matches_without_inputs_refuses_an_open_signature(converted):
    module, result = converted
    with pytest.raises(NormexportError, match=r"input 'input_ids' has shape \?x\?: its draws need every dim fixed") as info:
        assert_onnx_matches(module, result.output)
    assert "tuple" in info.value.hint


def test_inputs_as_a_tuple_bind_by_position(tmp_path):
    """As torch.onnx.export(model, args): a tuple binds to forward's parameters in order."""
    import own_model

    module = own_model.build(3)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(4))
    bias = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(5))
    result = normexport.convert(module, (ids, bias), output=tmp_path / "own.onnx")
    assert result.passed and [i["name"] for i in result.report.inputs] == ["input_ids", "bias"]
    assert result.report.inputs[0]["high"] == 100.0  # ids across the whole embedding
    ref_module = copy.deepcopy(module).double()
    ids2 = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(40))
    bias2 = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(50))
    with torch.no_grad():
        ref = ref_module(ids2, bias2.double()).numpy()
    (got,) = ort_helper.run(result.output, {"input_ids": ids2.numpy(), "bias": bias2.numpy()})
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)
    assert normexport.validate(module, result.output, (ids, bias)).passed
    tiny = tiny_lm()
    with pytest.raises(NormexportError, match="2 inputs given by position"):
        normexport.validate(tiny, result.output, (token_ids(1), token_ids(2)))


def test_a_tuple_for_forward_star_args_is_refused():
    class StarArgs(nn.Module):
        def forward(self, *xs):
            return xs[0]

    with pytest.raises(NormexportError, match=r"\*args"):
        normexport.api.load(StarArgs(), (torch.zeros(2),))


def test_a_layer_norm_model_is_refused_from_its_modules_before_any_export(tmp_path, monkeypatch):
    """A Pre-LN model in memory: refused with the ln2rms hint before torch.onnx runs."""
    from models.gpt2_style import gpt2_small

    from normexport import export

    def no_export(*a, **k):
        raise AssertionError("exported a model that has no RMSNorm")

    monkeypatch.setattr(export, "export_onnx", no_export)
    module, example = gpt2_small()
    with pytest.raises(NormexportError, match=r"no RMSNorm in GPT2Style \(in memory\): its 5 norm module\(s\) are LayerNorms") as info:
        normexport.convert(module, example, output=tmp_path / "g.onnx")
    assert "normexport.ln2rms(module, example_inputs)" in info.value.hint
    assert list(tmp_path.iterdir()) == []
    # the same model converted by ln2rms has RMSNorms: not refused from its modules
    from normexport.norm_modules import may_hold_rmsnorm

    rms, _ = normexport.ln2rms(module, example)
    assert may_hold_rmsnorm(rms)
