"""Inputs bind to forward() by name on every side (export, PyTorch, onnxruntime), integer ids
are drawn across the vocabulary of the embedding they index, masks are ones, and an example's
range survives an --input that only changes the shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import ort_helper
import two_input_model as tim
from normexport.cli import main
from normexport.errors import NormexportError
from normexport.load import InputSpec, LoadedModel, make_inputs, parse_input_spec

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converted with the inputs given in the reverse of the signature's order, no example."""
    tmp = tmp_path_factory.mktemp("byname")
    sd = tmp / "two.pt"
    torch.save(tim.build().state_dict(), sd)
    fused = tmp / "two.onnx"
    cwd = Path.cwd()
    try:
        import os

        os.chdir(HERE)
        r = CliRunner().invoke(
            main,
            ["convert", str(sd), "--factory", "two_input_model:module_only", "--input", "decoder_input_ids:int64:2x6", "--input", "input_ids:int64:2x6", "-o", str(fused), "--no-bench"],
        )
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    return sd, fused


def test_onnx_inputs_are_named_after_the_parameters_they_feed(converted):
    _, fused = converted
    assert [i.name for i in onnx.load(str(fused)).graph.input] == ["input_ids", "decoder_input_ids"]


def test_onnx_matches_pytorch_called_by_keyword_on_fresh_ids(converted):
    _, fused = converted
    model = tim.build()
    sess = ort_helper.session(fused, optimize=True)
    rng = np.random.default_rng(1234)
    enc = rng.integers(0, tim.ENC_VOCAB, (3, 9))
    dec = rng.integers(0, tim.DEC_VOCAB, (3, 9))
    assert enc.max() >= tim.DEC_VOCAB  # ids only the encoder's vocabulary has
    got = sess.run(None, {"decoder_input_ids": dec, "input_ids": enc})[0]
    with torch.no_grad():
        ref = model.double()(decoder_input_ids=torch.from_numpy(dec), input_ids=torch.from_numpy(enc)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)
    # the same ids bound the other way round give other numbers: the test can tell
    both = rng.integers(0, tim.DEC_VOCAB, (2, 2, 9))
    a = sess.run(None, {"input_ids": both[0], "decoder_input_ids": both[1]})[0]
    b = sess.run(None, {"input_ids": both[1], "decoder_input_ids": both[0]})[0]
    assert np.abs(a - b).max() > 1e-2


def _loaded(module, specs):
    from normexport.load import _forward_arg_names

    lm = LoadedModel(module, "state_dict", None, _forward_arg_names(module), None)
    return lm.with_inputs(specs)


def test_token_ids_draw_across_the_embedding_each_input_indexes():
    lm = _loaded(tim.build(), [parse_input_spec("decoder_input_ids:int64:4x64"), parse_input_spec("input_ids:int64:4x64")])
    specs = lm.require_specs()
    assert [(s.name, s.low, s.high) for s in specs] == [("input_ids", 0, tim.ENC_VOCAB), ("decoder_input_ids", 0, tim.DEC_VOCAB)]
    feed = make_inputs(specs, seed=7)
    for name, vocab in (("input_ids", tim.ENC_VOCAB), ("decoder_input_ids", tim.DEC_VOCAB)):
        ids = feed[name]
        assert ids.min() >= 0 and ids.max() < vocab
        assert len(torch.unique(ids)) > 0.8 * vocab  # across the vocabulary, not {0, 1}


def test_mask_draws_ones_and_positions_count_up():
    specs = [InputSpec("attention_mask", "int64", (2, 5)), InputSpec("position_ids", "int64", (2, 5)), InputSpec("pad_mask", "bool", (2, 5))]
    feed = make_inputs(specs, seed=3)
    assert torch.equal(feed["attention_mask"], torch.ones(2, 5, dtype=torch.int64))
    assert torch.equal(feed["position_ids"], torch.arange(5).expand(2, 5))
    assert bool(feed["pad_mask"].all())


def test_example_range_kept_when_only_the_shape_changes():
    m, ex = tim.with_example()
    from normexport.load import spec_of

    lm = _loaded(m, None)
    lm.input_specs = [spec_of(k, v) for k, v in ex.items()]
    lm.with_inputs([parse_input_spec("attention_mask:int64:3x40"), parse_input_spec("input_ids:int64:3x40"), parse_input_spec("decoder_input_ids:int64:3x5")])
    specs = {s.name: s for s in lm.require_specs()}
    for name in ("input_ids", "decoder_input_ids"):  # the example's ids span [0, max + 1)
        assert (specs[name].low, specs[name].high) == (0, int(ex[name].max()) + 1) and specs[name].high <= 20
    assert specs["input_ids"].shape == (3, 40)
    assert specs["attention_mask"].low is None  # ones, not a random {0, 1} mask
    assert list(specs) == ["input_ids", "decoder_input_ids", "attention_mask"]  # signature order


@pytest.mark.parametrize(
    "given, message",
    [
        (["input_ids:int64:2x6:0,51", "decoder_input_ids:int64:2x6"], "beyond the 50 rows"),
        (["input_ids:int64:2x6", "decoder_input_ids:int64:2x6:0,31"], "beyond the 30 rows"),
        (["input_ids:int64:2x6:-1,10", "decoder_input_ids:int64:2x6"], "beyond the 50 rows"),
        (["tokens:int64:2x6", "decoder_input_ids:int64:2x6"], "not an input of the model: forward(input_ids, decoder_input_ids, attention_mask=...)"),
        (["input_ids:int64:2x6", "input_ids:int64:2x6"], "given twice"),
        (["decoder_input_ids:int64:2x6"], "no --input given for model input(s) input_ids"),
        (["input_ids:int64:2x6", "decoder_input_ids:int64:2x6", "attention_mask:int64:2x5"], "cannot run on inputs"),
    ],
)
def test_bad_bindings_are_refused(given, message):
    with pytest.raises(NormexportError) as e:
        _loaded(tim.build(), [parse_input_spec(g) for g in given]).require_specs()
    assert message in e.value.message


def test_integer_input_that_indexes_nothing_needs_a_range():
    class Gather(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(8)

        def forward(self, x, index):
            return self.norm(x).gather(1, index)

    with pytest.raises(NormexportError, match="has no range"):
        _loaded(Gather(), [parse_input_spec("x:float32:2x8"), parse_input_spec("index:int64:2x3")]).require_specs()
    specs = _loaded(Gather(), [parse_input_spec("x:float32:2x8"), parse_input_spec("index:int64:2x3:0,8")]).require_specs()
    assert (specs[1].low, specs[1].high) == (0, 8)


def test_exported_archive_traces_vocab_from_its_graph(tmp_path):
    from normexport.load import load_model, save_exported

    m = tim.build()
    ex = {"input_ids": torch.randint(0, 5, (2, 6)), "decoder_input_ids": torch.randint(0, 5, (2, 6))}
    path = tmp_path / "two.pt2"
    save_exported(m, ex, path)
    lm = load_model(path).with_inputs([parse_input_spec("decoder_input_ids:int64:2x6"), parse_input_spec("input_ids:int64:2x6")])
    lm.input_specs = [InputSpec(s.name, s.dtype, s.shape) for s in lm.input_specs]  # no example ranges: trace them
    specs = lm.require_specs()
    assert [(s.name, s.high) for s in specs] == [("input_ids", tim.ENC_VOCAB), ("decoder_input_ids", tim.DEC_VOCAB)]


@pytest.mark.slow
def test_transformers_model_with_mask_given_before_ids(tmp_path, monkeypatch):
    """A transformers model as is, its inputs given in the other order than forward's: the
    ONNX model matches PyTorch called by keyword on ids across the vocabulary with a padded mask."""
    pytest.importorskip("transformers")
    import hf_phi3

    model = hf_phi3.build()
    sd = tmp_path / "phi3.pt"
    torch.save(model.state_dict(), sd)
    fused = tmp_path / "phi3.onnx"
    monkeypatch.chdir(HERE)
    r = CliRunner().invoke(main, ["convert", str(sd), "--factory", "hf_phi3:build", "--input", "attention_mask:int64:2x16", "--input", "input_ids:int64:2x16", "-o", str(fused), "--no-bench"])
    assert r.exit_code == 0, r.output
    sess = ort_helper.session(fused, optimize=True)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    rng = np.random.default_rng(99)
    ids = rng.integers(0, hf_phi3.VOCAB, (3, 11))
    mask = np.ones((3, 11), np.int64)
    mask[1, 8:] = 0  # right padding
    got = sess.run(None, {"attention_mask": mask, "input_ids": ids})[0]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)
    unmasked = sess.run(None, {"attention_mask": np.ones_like(mask), "input_ids": ids})[0]
    assert np.abs(unmasked[1, 8:] - got[1, 8:]).max() > 1e-3  # the mask reaches the attention


def test_torchscript_exporter_refuses_a_gap_in_the_positional_inputs():
    from typing import Optional

    from normexport.export import export_onnx
    from normexport.load import _forward_arg_names

    class Three(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(8)

        def forward(self, x, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None):
            y = self.norm(x)
            if scale is not None:
                y = y * scale
            if shift is not None:
                y = y + shift
            return y

    scripted = torch.jit.script(Three().eval())
    lm = LoadedModel(scripted, "torchscript", None, _forward_arg_names(scripted), None)
    with pytest.raises(NormexportError, match="takes 'scale' before shift"):
        export_onnx(lm, {"x": torch.randn(2, 8), "shift": torch.randn(2, 8)})
