"""normexport ln2rms: Pre-LN -> Pre-RMSNorm conversion, archive, refusals, CLI."""

from __future__ import annotations

import importlib.util
import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from models.gpt2_style import (
    build_gpt2,
    gpt2_mlp_no_out_proj,
    gpt2_post_ln,
    gpt2_small,
    randomize_,
)
from normexport.errors import NormexportError
from normexport.ln2rms import REL_TOL, RMSNorm, export_archive, ln2rms, ln2rms_command

ROOT = Path(__file__).resolve().parents[1]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / a.abs().max()).item()


def fresh_ids(seed: int, shape=(2, 24), vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randint(0, vocab, shape, generator=g)


SHAPES = [(1, 16), (3, 33), (2, 128)]


@pytest.fixture(scope="module")
def small():
    return gpt2_small()


@pytest.fixture(scope="module", params=[False, True], ids=["keep-affine", "fold-affine"])
def converted(request, small):
    model, example = small
    conv, report = ln2rms(model, example, fold_affine=request.param)
    return request.param, model, conv, report


# ---------------------------------------------------------------------------------------------
# conversion


def test_logits_match_on_fresh_inputs(converted):
    fold, model, conv, report = converted
    assert report.passed and report.max_rel <= REL_TOL
    with torch.no_grad():
        for i, shape in enumerate(SHAPES):
            ids = fresh_ids(i, shape)
            assert rel_err(model(ids), conv(ids)) <= REL_TOL, shape


def test_no_layernorm_left_and_report(converted):
    fold, model, conv, report = converted
    assert not any(isinstance(m, nn.LayerNorm) for m in conv.modules())
    norms = [m for m in conv.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 5  # 2 blocks x 2 + final
    assert report.layer_norms_replaced == 5
    assert report.blocks_converted == 2 and report.residual_branches == 4
    assert report.embeddings_recentered == 2 and report.projections_recentered == 4
    assert report.head_untied and report.untied == ["lm_head.weight"]
    assert report.samples == 3
    if fold:
        assert report.folded == 5
        assert all(n.weight is None and n.bias is None for n in norms)
        assert conv.lm_head.bias is not None  # beta folded into the (bias-less) head
    else:
        assert report.folded == 0
        assert all(n.weight is not None and n.bias is not None for n in norms)
    json.dumps(report.to_dict())


def test_recentring_is_what_the_paper_says(converted):
    fold, model, conv, report = converted
    for emb in (conv.wte, conv.wpe):  # every embedding row has zero mean
        assert emb.weight.mean(dim=1).abs().max() < 1e-6
    for block in conv.h:  # nn.Linear [out, in]: zero mean over the OUTPUT features
        for lin in (block.attn.c_proj, block.mlp.c_proj):
            assert lin.weight.mean(dim=0).abs().max() < 1e-6
            assert abs(lin.bias.mean().item()) < 1e-6
    # the untied head keeps the ORIGINAL table (times gamma when folded)
    ref = model.wte.weight
    if fold:
        ref = ref * model.ln_f.weight[None, :]
    torch.testing.assert_close(conv.lm_head.weight, ref)
    assert conv.lm_head.weight is not conv.wte.weight


def test_stream_is_zero_mean_at_every_norm(converted):
    _, _, conv, _ = converted
    ratios = []

    def hook(_m, args):
        x = args[0].double()
        ratios.append((x.mean(-1).abs() / x.pow(2).mean(-1).sqrt()).max().item())

    handles = [m.register_forward_pre_hook(hook) for m in conv.modules() if isinstance(m, RMSNorm)]
    try:
        with torch.no_grad():
            conv(fresh_ids(7))
    finally:
        for h in handles:
            h.remove()
    assert len(ratios) == 5 and max(ratios) < 1e-5


def test_original_is_left_alone(small):
    model, example = small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ln2rms(model, example, fold_affine=True)
    assert model.lm_head.weight is model.wte.weight
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_keeping_the_head_tied_would_be_wrong(converted):
    """Negative control for the untying maths: a head on the recentred table is not equivalent,
    because the final norm's output (gamma * x_hat + beta) is not zero-mean."""
    _, model, conv, _ = converted
    wrong = copy.deepcopy(conv)
    wrong.lm_head.weight = wrong.wte.weight
    if wrong.lm_head.bias is not None:  # folded: bias was W @ beta with the original W
        wrong.lm_head.bias = None
    with torch.no_grad():
        ids = fresh_ids(3)
        assert rel_err(model(ids), wrong(ids)) > 1e-2


def test_four_layers():
    model, example = build_gpt2(n_layer=4)
    conv, report = ln2rms(model, example, fold_affine=True)
    assert report.blocks_converted == 4 and report.layer_norms_replaced == 9 and report.folded == 9
    with torch.no_grad():
        ids = fresh_ids(1, (2, 50))
        assert rel_err(model(ids), conv(ids)) <= REL_TOL


def test_untied_head_and_no_affine_norms():
    model, example = build_gpt2(tie_head=False)
    model.h[0].ln_1 = nn.LayerNorm(64, elementwise_affine=False).eval()
    model.h[1].ln_2 = nn.LayerNorm(64, bias=False).eval()
    with torch.no_grad():
        model.h[1].ln_2.weight.copy_(1 + 0.3 * torch.randn(64, generator=torch.Generator().manual_seed(3)))
    for fold in (False, True):
        conv, report = ln2rms(model, example, fold_affine=fold)
        assert not report.head_untied
        if not fold:
            assert torch.equal(conv.lm_head.weight, model.lm_head.weight)
        with torch.no_grad():
            ids = fresh_ids(2)
            assert rel_err(model(ids), conv(ids)) <= REL_TOL
        if fold:
            assert report.folded == 4  # the affine-free norm has nothing to fold


# ---------------------------------------------------------------------------------------------
# fold-affine only where every consumer is linear


class _TanhBlock(nn.Module):
    """Pre-LN block whose norm output feeds a tanh before the linear layer."""

    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(torch.tanh(self.ln(x)))


class _Tiny(nn.Module):
    def __init__(self, block, d=32, vocab=100):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.block = block
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        return self.head(self.ln_f(self.block(self.emb(input_ids))))


def _tiny(block):
    torch.manual_seed(0)
    return randomize_(_Tiny(block), seed=1).eval(), {"input_ids": torch.randint(0, 100, (1, 12))}


def test_fold_skipped_where_a_consumer_is_not_linear():
    model, example = _tiny(_TanhBlock(32))
    conv, report = ln2rms(model, example, fold_affine=True)
    assert report.folded == 1 and report.folded_norms == ["ln_f"]
    assert any("block.ln" in n and "affine kept" in n for n in report.notes)
    assert conv.block.ln.weight is not None
    with torch.no_grad():
        ids = fresh_ids(4, (2, 12), vocab=100)
        assert rel_err(model(ids), conv(ids)) <= REL_TOL


# ---------------------------------------------------------------------------------------------
# refusals


def test_refuses_post_ln():
    model, example = gpt2_post_ln()
    with pytest.raises(NormexportError, match="Post-LN") as e:
        ln2rms(model, example)
    assert e.value.hint


def test_refuses_branch_without_output_projection():
    model, example = gpt2_mlp_no_out_proj()
    with pytest.raises(NormexportError, match="not in a linear layer") as e:
        ln2rms(model, example)
    assert "gelu" in e.value.message and e.value.hint


class _UnnormedBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        x = x + self.fc(self.ln(x))
        return x + self.fc2(x)  # reads the stream without a norm


def test_refuses_stream_read_without_norm():
    model, example = _tiny(_UnnormedBlock(32))
    with pytest.raises(NormexportError, match="read without a LayerNorm by linear layer block.fc2"):
        ln2rms(model, example)


def test_refuses_training_mode():
    model, example = build_gpt2()
    model.train()
    with pytest.raises(NormexportError, match="training mode") as e:
        ln2rms(model, example)
    assert "eval" in e.value.hint
    model.eval()
    model.h[0].mlp.dropout.train()
    with pytest.raises(NormexportError, match=r"h\.0\.mlp\.dropout"):
        ln2rms(model, example)


# ---------------------------------------------------------------------------------------------
# archive and ONNX


def test_archive_loads_and_matches(converted, tmp_path):
    fold, model, conv, _ = converted
    out = tmp_path / "conv.pt2"
    facts = export_archive(conv, {"input_ids": fresh_ids(0, (1, 16))}, out)
    assert out.exists() and not [p for p in tmp_path.iterdir() if p.name != "conv.pt2"]  # no temp left
    assert set(facts["dynamic_dims"]) == {"input_ids[0]", "input_ids[1]"}
    loaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        for i, shape in enumerate(SHAPES):
            ids = fresh_ids(20 + i, shape)
            assert rel_err(model(ids), loaded(ids)) <= REL_TOL
            torch.testing.assert_close(loaded(ids), conv(ids), rtol=0, atol=1e-5)


def test_onnx_export_has_no_layernormalization(converted):
    fold, model, conv, _ = converted
    ids = fresh_ids(5, (1, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = torch.onnx.export(model, (ids,), dynamo=True, opset_version=18, verbose=False)
        program = torch.onnx.export(conv, (ids,), dynamo=True, opset_version=18, verbose=False)
    assert "LayerNormalization" in {n.op_type for n in original.model_proto.graph.node}  # sanity
    ops = [n.op_type for n in program.model_proto.graph.node]
    assert "LayerNormalization" not in ops
    assert ops.count("ReduceMean") == 5 and ops.count("Reciprocal") == 5  # the RMS chain, 5 times
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        assert rel_err(model(ids), torch.from_numpy(got)) <= REL_TOL


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture()
def cli_env(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # so that --factory models.gpt2_style:... imports
    return tmp_path


def _save_state(factory, path):
    model, _ = factory()
    torch.save(model.state_dict(), path)
    return model


def test_cli_end_to_end(cli_env):
    sd, out, rep = cli_env / "sd.pt", cli_env / "out" / "conv.pt2", cli_env / "rep.json"
    out.parent.mkdir()  # an output folder must exist (a missing one is refused before any work)
    model = _save_state(gpt2_small, sd)
    res = CliRunner().invoke(
        ln2rms_command,
        [str(sd), "-o", str(out), "--factory", "models.gpt2_style:gpt2_small", "--fold-affine", "--report", str(rep)],
    )
    assert res.exit_code == 0, res.output
    assert "LayerNorms -> RMSNorm" in res.output
    data = json.loads(rep.read_text())
    assert data["passed"] and data["max_rel"] <= REL_TOL and data["folded"] == 5
    assert data["layer_norms_replaced"] == 5 and data["head_untied"] and data["output"] == str(out)
    loaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        ids = fresh_ids(9, (2, 40))
        assert rel_err(model(ids), loaded(ids)) <= REL_TOL
    # normexport's own loader reads the archive without the factory
    from normexport.load import load_model

    lm = load_model(out)
    assert lm.kind == "export"
    with torch.no_grad():
        assert rel_err(model(ids), lm.module(ids)) <= REL_TOL


@pytest.mark.parametrize(
    "factory,needle",
    [(gpt2_post_ln, "Post-LN"), (gpt2_mlp_no_out_proj, "not in a linear layer")],
    ids=["post-ln", "no-out-proj"],
)
def test_cli_refusals_exit_2(cli_env, factory, needle):
    sd, out = cli_env / "sd.pt", cli_env / "conv.pt2"
    _save_state(factory, sd)
    res = CliRunner().invoke(ln2rms_command, [str(sd), "-o", str(out), "--factory", f"models.gpt2_style:{factory.__name__}"])
    assert res.exit_code == 2, res.output
    assert "error: " in res.output and needle in res.output and "hint: " in res.output
    assert not out.exists()


def test_cli_never_writes_over_model(cli_env):
    sd = cli_env / "sd.pt"
    _save_state(gpt2_small, sd)
    before = sd.read_bytes()
    res = CliRunner().invoke(ln2rms_command, [str(sd), "-o", str(sd), "--factory", "models.gpt2_style:gpt2_small"])
    assert res.exit_code == 2 and "overwrite" in res.output
    assert sd.read_bytes() == before


def test_cli_refuses_torch_export_archive(cli_env):
    model, example = gpt2_small()
    src = cli_env / "orig.pt2"
    torch.export.save(torch.export.export(model, (example["input_ids"],)), str(src))
    res = CliRunner().invoke(ln2rms_command, [str(src), "-o", str(cli_env / "o.pt2")])
    assert res.exit_code == 2 and "no nn.LayerNorm modules" in res.output


# ---------------------------------------------------------------------------------------------
# HF GPT-2 (Conv1D)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize("fold", [False, True], ids=["keep-affine", "fold-affine"])
def test_hf_gpt2(fold, tmp_path):
    from models.gpt2_style import gpt2_hf_tiny

    model, example = gpt2_hf_tiny()
    conv, report = ln2rms(model, example, fold_affine=fold)
    assert report.passed and report.layer_norms_replaced == 5 and report.blocks_converted == 2
    assert report.head_untied and report.folded == (5 if fold else 0)
    assert not any(isinstance(m, nn.LayerNorm) for m in conv.modules())
    for block in conv.lm.transformer.h:  # Conv1D weight is [in, out]: zero mean over dim 1
        for c in (block.attn.c_proj, block.mlp.c_proj):
            assert type(c).__name__ == "Conv1D"
            assert c.weight.mean(dim=1).abs().max() < 1e-6 and abs(c.bias.mean().item()) < 1e-6
    out = tmp_path / "hf.pt2"
    export_archive(conv, example, out)
    loaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        for i, shape in enumerate([(1, 16), (2, 40)]):
            ids = fresh_ids(30 + i, shape)
            ref = model(ids)
            assert rel_err(ref, conv(ids)) <= REL_TOL
            assert rel_err(ref, loaded(ids)) <= REL_TOL


def test_rmsnorm_module_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    x = x - x.mean(-1, keepdim=True)
    ln = nn.LayerNorm(8, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(8))
        ln.bias.copy_(torch.randn(8))
    rms = RMSNorm(8, 1e-5, ln.weight, ln.bias)
    torch.testing.assert_close(rms(x), ln(x), rtol=1e-5, atol=1e-6)  # equal on zero-mean inputs
