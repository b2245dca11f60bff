"""`convert --quantize`: onnxruntime's MatMulNBits in place of the weight MatMuls, the fused
norms kept, and the quantized check measured against PyTorch on a trained checkpoint (random
weights give flat logits, where top-1 flips on noise): it passes on the model as quantized and
fails where one MatMulNBits' scales were multiplied by 4."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")

from cli_helper import invoke  # noqa: E402
from hf_folders import genai_generate  # noqa: E402
from quant_helpers import break_quantizer, break_scales, int4_rows, top1_agreement  # noqa: E402
from trained_tiny import trained_llama, trained_model_file  # noqa: E402

from normexport.hf.generation import OnnxDecoder, random_prompts, torch_greedy  # noqa: E402
from normexport.quant_check import DEFAULT_THRESHOLDS, compare_rows, summarize  # noqa: E402

FUSED_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
GEN_TOKENS = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The trained checkpoint: repoint here to check another one."""
    return trained_llama(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def torch_model(trained):
    return transformers.AutoModelForCausalLM.from_pretrained(str(trained), local_files_only=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def int4(trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int4")
    out, rep = tmp / "out", tmp / "report.json"
    result = invoke("convert", trained, "-o", out, "--quantize", "int4", "--gen-tokens", GEN_TOKENS, "--report", rep)
    assert result.exit_code == 0, result.output + result.stderr
    return out, json.loads(rep.read_text())


def _nodes(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def _linear_weights(module) -> list[np.ndarray]:
    """Every nn.Linear weight as [in, out] (MatMul's B), in module order."""
    return [m.weight.detach().numpy().T.astype(np.float64) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _dequantize(node: onnx.NodeProto, inits: dict) -> np.ndarray:
    """MatMulNBits' B back in float as [K, N] (MatMul's layout)."""
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs["bits"] == 4
    packed, scales = (onnx.numpy_helper.to_array(inits[name]) for name in node.input[1:3])
    return int4_rows(packed, scales, attrs["N"], attrs["K"], attrs["block_size"]).T


def test_weight_matmuls_become_matmulnbits_and_norms_stay(int4, torch_model):
    out, report = int4
    nodes = _nodes(out / "model.onnx")
    inits = {i.name: i for i in onnx.load(str(out / "model.onnx")).graph.initializer}
    float_weight_matmuls = [n.name for n in nodes if n.op_type == "MatMul" and n.input[1] in inits]
    assert float_weight_matmuls == []
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    assert {(a["bits"], a["block_size"], a["accuracy_level"]) for a in attrs} == {(4, 32, 4)}
    layers = torch_model.config.num_hidden_layers
    norms = [n for n in nodes if n.op_type in FUSED_OPS]
    assert len(norms) == 2 * layers + 1 == sum(1 for m in torch_model.modules() if type(m).__name__.endswith("RMSNorm"))
    for n in norms:  # the norm's scale stays an fp32 initializer: the norm computes in fp32
        assert inits[n.input[-1] if n.op_type == "SimplifiedLayerNormalization" else n.input[2]].data_type == onnx.TensorProto.FLOAT
    assert report["quantization"]["fused_norms"] == {"before": len(norms), "after": len(norms)}
    assert report["quantized_accuracy"]["stress"]["passed"] is True
    assert report["quantized_accuracy"]["stress"]["checked"] == len(norms)
    # The LM head is quantized too (onnxruntime-genai's default), the embedding is not.
    assert any(n.output[0] == "logits" for n in nbits)
    assert [n.op_type for n in nodes if n.op_type.startswith("Gather") and n.input[1] == "input_ids"] == ["Gather"]


def test_quantized_weights_are_round_to_nearest_of_pytorchs(int4, torch_model):
    """Each MatMulNBits dequantizes to one of the model's Linear weights (or a run of them
    packed side by side): every weight within one step of its block's scale (symmetric int4
    maps the block's largest magnitude to -8, so the other sign clips at +7), nearly all within
    half a step (rounding): the quantizer took the right weights, in the right layout."""
    out, _ = int4
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    weights = _linear_weights(torch_model)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits
    for node in nbits:
        w = _dequantize(node, inits)
        scales = onnx.numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(w.shape[1], -1)
        step = np.repeat(np.abs(scales).T, 32, axis=0)[: w.shape[0]]
        assert any(np.all(np.abs(ref - w) <= step + 1e-6) and np.mean(np.abs(ref - w) <= step / 2 + 1e-6) > 0.98 for ref in _candidates(weights, w.shape)), node.name


def _candidates(weights: list[np.ndarray], shape) -> list[np.ndarray]:
    """One Linear weight of this shape, or runs of consecutive ones side by side (the exporter
    packs q/k/v and gate/up into one MatMul)."""
    k, n = shape
    found = []
    for size in (1, 2, 3):
        for i in range(len(weights) - size + 1):
            group = weights[i : i + size]
            if all(w.shape[0] == k for w in group) and sum(w.shape[1] for w in group) == n:
                found.append(np.concatenate(group, axis=1))
    return found


def test_quantized_check_passes_on_the_trained_model(int4, torch_model):
    """The report's numbers, and the same measures recomputed here in float64 on fresh prompts."""
    out, report = int4
    acc = report["quantized_accuracy"]
    assert acc["passed"] is True and report["validation"]["passed"] is True
    assert acc["thresholds"] == vars(DEFAULT_THRESHOLDS["int4"])
    assert report["generation"]["passed"] is True  # the fp32 graph before quantization: token for token
    decoder = OnnxDecoder(out)
    top1, kl = [], []
    for prompt in random_prompts(torch_model.config.vocab_size, 3, 6, seed=777):
        tokens, ref = torch_greedy(torch_model, prompt, GEN_TOKENS)
        ref = np.stack(ref).astype(np.float64)
        _, got = decoder.generate(prompt, GEN_TOKENS, forced=tokens)
        got = np.stack(got).astype(np.float64)
        top1.append(top1_agreement(ref, got))
        p = np.exp(ref - ref.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        q = np.exp(got - got.max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        kl += list((p * (np.log(p) - np.log(q))).sum(-1))
    assert np.mean(top1) >= DEFAULT_THRESHOLDS["int4"].min_top1
    assert np.mean(kl) <= DEFAULT_THRESHOLDS["int4"].max_kl
    assert np.mean(top1) < 1.0 or np.mean(kl) > 0  # int4 is measurably not the fp32 model


@pytest.mark.parametrize("index", [0, 1, -2, -1], ids=["first-layer-qkv", "first-layer-o-proj", "last-down-proj", "lm-head"])
def test_quantized_check_fails_on_broken_scales(int4, torch_model, tmp_path, index):
    """One MatMulNBits' scales x4 fails the check on the default thresholds: the first layer's
    q/k/v and output projection, the last layer's down projection (which the residual stream
    dilutes: its top-5 overlap and worst cosine catch it), and the LM head (whose argmax a scale
    keeps: KL catches it)."""
    from normexport.quant_check import check_quantized_decoder

    out, report = int4
    name = break_scales(out, tmp_path / "broken", index, 4.0)
    result = check_quantized_decoder(torch_model, OnnxDecoder(tmp_path / "broken"), GEN_TOKENS, 0, DEFAULT_THRESHOLDS["int4"])
    assert not result.passed, (name, result.summary)
    assert report["quantized_accuracy"]["passed"]  # convert checked the same prompts (seed 0) on the folder as written


def test_validate_fails_a_broken_quantized_folder(int4, trained, tmp_path):
    """validate DIR OUTDIR on a quantized folder runs the quantized check: exit 1 with scales x4."""
    out, _ = int4
    break_scales(out, tmp_path / "broken", 0, 4.0)
    rep = tmp_path / "r.json"
    result = invoke("validate", trained, tmp_path / "broken", "--report", rep)
    assert result.exit_code == 1, result.output + result.stderr
    acc = json.loads(rep.read_text())["quantized_accuracy"]
    assert acc["passed"] is False and acc["failures"], acc["summary"]


def test_validate_passes_the_folder_as_written(int4, trained, tmp_path):
    out, _ = int4
    result = invoke("validate", trained, out, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output + result.stderr
    assert "quantized check: PASSED" in result.output


@pytest.mark.slow
def test_a_failed_quantized_check_writes_nothing(trained, tmp_path, monkeypatch):
    """convert with a quantizer that breaks one block's scales: exit 1, no folder."""
    break_quantizer(monkeypatch, 0)
    out = tmp_path / "out"
    result = invoke("convert", trained, "-o", out, "--quantize", "int4", "--gen-tokens", 8)
    assert result.exit_code == 1, result.output + result.stderr
    assert not out.exists()
    assert "quantized check: FAILED" in result.output


def test_a_decoder_without_cache_is_measured_and_fails_when_broken(trained, torch_model, tmp_path, monkeypatch):
    """--task text-generation --quantize int4: the logits at every position of seeded sequences
    against transformers in fp32 (recomputed here on the written model), and exit 1 with nothing
    written once the first block's scales are x4."""
    import onnxruntime as ort

    out, rep = tmp_path / "out", tmp_path / "r.json"
    result = invoke("convert", trained, "-o", out, "--task", "text-generation", "--quantize", "int4", "--report", rep)
    assert result.exit_code == 0, result.output + result.stderr
    acc = json.loads(rep.read_text())["quantized_accuracy"]
    assert acc["passed"] and acc["summary"]["rows"] == 2 * 32 and acc["stress"]["passed"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    ids = rng.integers(0, torch_model.config.vocab_size, size=(1, 24))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(24)[None]}
    got = session.run(["logits"], {k: v.astype(np.int64) for k, v in feed.items() if k in {i.name for i in session.get_inputs()}})[0][0].astype(np.float64)
    with torch.inference_mode():
        ref = torch_model(input_ids=torch.tensor(ids)).logits[0].double().numpy()
    assert top1_agreement(ref, got) >= DEFAULT_THRESHOLDS["int4"].min_top1
    assert 0 < np.abs(ref - got).max()  # quantized: measurably not the fp32 model
    break_quantizer(monkeypatch, 0)
    bad = tmp_path / "bad"
    result = invoke("convert", trained, "-o", bad, "--task", "text-generation", "--quantize", "int4")
    assert result.exit_code == 1, result.output + result.stderr
    assert not bad.exists() and "quantized check: FAILED" in result.output


def test_onnxruntime_genai_runs_the_quantized_folder(int4, trained):
    """onnxruntime-genai reads the quantized folder and decodes the tokens normexport's own
    onnxruntime loop decodes on the same graph (up to the EOS where onnxruntime-genai stops)."""
    og = pytest.importorskip("onnxruntime_genai")
    out, _ = int4
    model = og.Model(str(out))
    decoder = OnnxDecoder(out)
    vocab = json.loads((trained / "config.json").read_text())["vocab_size"]
    for prompt in random_prompts(vocab, 2, 5, seed=99):
        tokens = genai_generate(model, prompt, GEN_TOKENS)
        ours = decoder.generate(prompt, GEN_TOKENS)[0]
        eos = json.loads((trained / "config.json").read_text())["eos_token_id"]
        assert tokens == ours[: len(tokens)] and (len(tokens) == GEN_TOKENS or tokens[-1] == eos), (tokens, ours)


@pytest.mark.slow
def test_int8_and_options(trained, tmp_path):
    """int8, block 64, accuracy level 1, LM head kept in fp32, passes int8's tighter bounds."""
    out, rep = tmp_path / "out", tmp_path / "r.json"
    result = invoke("convert", trained, "-o", out, "--quantize", "int8", "--quant-block-size", 64, "--quant-accuracy-level", 1, "--no-quantize-lm-head", "--gen-tokens", 8, "--report", rep)
    assert result.exit_code == 0, result.output + result.stderr
    nodes = _nodes(out / "model.onnx")
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits"]
    assert attrs and {(a["bits"], a["block_size"], a["accuracy_level"]) for a in attrs} == {(8, 64, 1)}
    assert next(n for n in nodes if n.output[0] == "logits").op_type == "MatMul"
    report = json.loads(rep.read_text())
    assert report["quantized_accuracy"]["thresholds"] == vars(DEFAULT_THRESHOLDS["int8"])
    assert report["quantized_accuracy"]["summary"]["top1_agreement"] >= DEFAULT_THRESHOLDS["int8"].min_top1


def test_model_file_quantized(trained, tmp_path):
    """convert MODEL.pt --quantize int4: the fp32 graph validated exactly, the quantized one
    measured on the thresholds and written."""
    path = trained_model_file(trained, tmp_path / "trained.pt")
    vocab = json.loads((trained / "config.json").read_text())["vocab_size"]
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    result = invoke("convert", path, "--trust-pickle", "--input", f"input_ids:int64:2x24:3,{vocab}", "-o", out, "--quantize", "int4", "--no-bench", "--report", rep)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(rep.read_text())
    assert report["validation"]["passed"] and report["quantized_accuracy"]["passed"]
    ops = [n.op_type for n in _nodes(out)]
    assert ops.count("MatMulNBits") >= 8 and ops.count("SimplifiedLayerNormalization") == 5
    again = invoke("validate", path, out, "--trust-pickle", "--input", f"input_ids:int64:2x24:3,{vocab}", "--seed", 7)
    assert again.exit_code == 0 and "quantized check: PASSED" in again.output, again.output + again.stderr


@pytest.mark.slow
def test_bench_times_int4_beside_the_builders_int4(int4, trained, tmp_path):
    """bench DIR OUTDIR --builder auto: PyTorch, the unfused export, OUTDIR, and
    onnxruntime-genai running OUTDIR and the builder's int4 folder built from DIR, with sizes."""
    pytest.importorskip("onnxruntime_genai")
    from test_hf import save_tokenizer

    out, _ = int4
    source = tmp_path / "source"
    shutil.copytree(trained, source)
    save_tokenizer(source, json.loads((trained / "config.json").read_text())["vocab_size"])
    rep = tmp_path / "b.json"
    result = invoke("bench", source, out, "--builder", "auto", "--prompt-len", 8, "--new-tokens", 4, "--rounds", 1, "--report", rep)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(rep.read_text())
    rows = {v["variant"]: v for v in report["variants"]}
    assert list(rows) == ["torch eager (cache)", "onnx unfused", f"onnx fused ({out.name})", f"onnxruntime-genai, {out.name}", "onnxruntime-genai, builder int4"]
    assert report["threads"] == 1
    for name, v in rows.items():
        assert v["prefill_ms"] > 0 and v["decode_ms_per_token"] > 0, name
    assert rows["onnx unfused"]["tokens_equal_reference"]
    assert rows["onnxruntime-genai, builder int4"]["quantized"] == "int4" == rows[f"onnx fused ({out.name})"]["quantized"]
    ours, theirs = rows[f"onnx fused ({out.name})"]["size_mb"], rows["onnxruntime-genai, builder int4"]["size_mb"]
    assert 0 < ours < rows["onnx unfused"]["size_mb"] / 2 and 0 < theirs


@pytest.mark.parametrize("args, words", [
    (["--quant-block-size", "64"], "needs --quantize"),
    (["--min-top1", "0.5"], "needs --quantize"),
    (["--quantize", "int8", "--quantize-embeddings"], "int4 embeddings only"),
    (["--quantize", "int4", "--target", "trt-plugin"], "does not apply to --target trt-plugin"),
    (["--quantize", "int4", "--dtype", "float16"], "does not combine"),
    (["--quantize", "int2"], "Invalid value"),
    (["--quantize", "int4", "--max-kl", "nan"], "not a finite number"),
    (["--quantize", "int4", "--min-top1", "nan"], "not a finite number"),
    (["--quantize", "int4", "--max-kl", "inf"], "not a finite number"),
    (["--quantize", "int4", "--min-top5", "1.5"], "not in the range"),
])
def test_bad_quantize_options(trained, tmp_path, args, words):
    out = tmp_path / "out"
    result = invoke("convert", trained, "-o", out, *args)
    assert result.exit_code == 2, result.output + result.stderr
    assert words in result.stderr and "hint:" in result.stderr
    assert not out.exists()


def test_compare_rows_against_float64():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(6, 50)) * 3
    got = ref + rng.normal(size=ref.shape) * 0.5
    got[2] = -ref[2]
    rows = compare_rows(ref, got)
    for i, r in enumerate(rows):
        p = np.exp(ref[i]) / np.exp(ref[i]).sum()
        q = np.exp(got[i]) / np.exp(got[i]).sum()
        assert r.kl == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-9)
        assert r.cosine == pytest.approx(float(ref[i] @ got[i] / np.linalg.norm(ref[i]) / np.linalg.norm(got[i])), rel=1e-12)
        assert r.top1_exact == (ref[i].argmax() == got[i].argmax())
        # a near-tie: PyTorch gives the quantized pick at least half the probability of its own
        assert r.top1 == (p[got[i].argmax()] >= 0.5 * p.max() - 1e-12)
        ref5, got5 = np.argsort(ref[i])[-5:], np.argsort(got[i])[-5:]
        assert r.top5_exact == len(set(ref5) & set(got5)) / 5
        # each quantized top-5 token PyTorch rates at least half as likely as its own 5th counts
        assert r.top5 == sum(p[t] >= 0.5 * p[ref5].min() - 1e-12 for t in got5) / 5
        assert r.top5 >= r.top5_exact
    assert rows[2].cosine == pytest.approx(-1.0) and not rows[2].top1 and not rows[2].top1_exact


def test_top1_counts_a_flip_only_off_a_near_tie():
    """PyTorch's logits [2.0, 1.5, ...]: the quantized model picking token 1 is a near-tie
    (PyTorch rates it e^-0.5 = 0.61 as likely) and counts as agreement, not as exact; picking
    token 2 (logit 1.0, e^-1 = 0.37 as likely) is a flip that counts against it."""
    ref = np.array([[2.0, 1.5, 1.0, -3.0, -3.0, -3.0]] * 3)
    got = ref.copy()
    got[1, 1] = 2.5
    got[2, 2] = 2.5
    rows = compare_rows(ref, got)
    assert [(r.top1, r.top1_exact) for r in rows] == [(True, True), (True, False), (False, False)]
    assert [r.top1_gap for r in rows] == pytest.approx([0.0, 0.5, 1.0])
    s = summarize(rows)
    assert (s.top1_agreement, s.top1_exact) == pytest.approx((2 / 3, 1 / 3))


def test_quantize_model_with_external_data(tmp_path):
    """A model whose weights live in a .data file beside it (every model over ~1.8 GB): the
    quantizer gets the weights, the norm stays, and the output matches numpy's fp64 product
    within int4's error."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    import onnxruntime as ort

    from normexport.fuse import load_onnx, save_onnx
    from normexport.quantize import QuantizeOptions, quantize_model

    rng = np.random.default_rng(3)
    w = rng.normal(size=(128, 96)).astype(np.float32)
    g = (1 + 0.2 * rng.normal(size=128)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["n"], axis=-1, epsilon=1e-5), helper.make_node("MatMul", ["n", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 128])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 96])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(g, "g")],
    )
    src = tmp_path / "src" / "model.onnx"
    save_onnx(ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])), src, external=True)
    assert (tmp_path / "src" / "model.onnx.data").is_file()
    quantized, report = quantize_model(load_onnx(src), QuantizeOptions("int4"))
    assert report.quantized == {"MatMulNBits": 1} and report.norms_before == report.norms_after == 1
    dst = tmp_path / "q" / "model.onnx"
    save_onnx(quantized, dst)
    x = rng.normal(size=(4, 128)).astype(np.float32)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].astype(np.float64)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * g @ w.astype(np.float64)
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.99 and np.abs(got - ref).max() < 0.2 * np.abs(ref).max()
