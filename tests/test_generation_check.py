"""The LLM path's check tells the truth, on a real trained checkpoint and on broken ones.

models/tiny-trained-llama (trained by models/train_tiny_llama.py on the Zen of Python, EOS after
every line) converts and passes with EOS inside the window; normexport's loop, `generate` and
onnxruntime-genai stop at EOS exactly where transformers' generate() does. A generation config
with processors the graph does not hold passes with a note; NaN weights, doubled logits and
weights that are not the checkpoint's fail (exit 1 or 2). Reports are strict JSON.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")

from cli_helper import assert_refused, invoke, snapshot  # noqa: E402
from hf_folders import MORE_FAMILIES, genai_generate, hf_generate, save_tiny  # noqa: E402
from normexport.hf.generation import OnnxDecoder, check_generation, torch_forced_logits, torch_generate, torch_greedy  # noqa: E402

TRAINED = Path(__file__).resolve().parent.parent / "models" / "tiny-trained-llama"
EOS = 2
WINDOW = 32


def strict_json(path: Path) -> dict:
    """The file parsed as strict JSON: a bare NaN or Infinity is an error."""

    def refuse(name):
        raise AssertionError(f"{path} holds a bare {name}: not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def load(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()


def zen_lines() -> list[str]:
    import importlib.util
    import codecs

    source = Path(importlib.util.find_spec("this").origin).read_text()
    text = codecs.decode(source.split('s = """', 1)[1].split('"""', 1)[0], "rot13")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shipped trained model, converted once (default options)."""
    tmp = tmp_path_factory.mktemp("trained")
    out, rep = tmp / "out", tmp / "report.json"
    result = invoke("convert", TRAINED, "-o", out, "--report", rep)
    assert result.exit_code == 0, result.output + result.stderr
    return out, strict_json(rep), result


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(TRAINED))


@pytest.fixture(scope="module")
def reference():
    return load(TRAINED)


def zen_prompts(tokenizer, count: int = 6) -> list[tuple[list[int], str]]:
    """BOS + the first three tokens of a line, and the rest of the line as text."""
    out = []
    for line in zen_lines()[1:1 + count]:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        out.append(([1, *ids[:3]], tokenizer.decode(ids[3:])))
    return out


def test_the_shipped_model_is_small_and_trained(reference, tokenizer):
    """A few MB; it recites the Zen of Python with peaked distributions and ends each line with EOS."""
    assert sum(p.stat().st_size for p in TRAINED.iterdir()) < 3_000_000
    assert reference.generation_config.eos_token_id == EOS
    recited = 0
    for prompt, rest in zen_prompts(tokenizer):
        tokens = hf_generate(reference, prompt, WINDOW)
        assert tokens[-1] == EOS and len(tokens) < WINDOW
        recited += tokenizer.decode(tokens[:-1]) == rest
        with torch.inference_mode():
            probs = reference(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].softmax(-1)
        assert float(probs.max(-1).values.median()) > 0.9  # peaked, not a flat random model
    assert recited >= 5


def test_trained_model_converts_and_passes_with_eos_in_the_window(trained):
    out, report, result = trained
    gen = report["generation"]
    assert gen["passed"] and gen["eos_token_ids"] == [EOS] and gen["failures"] == []
    assert gen["logits_atol"] == 1e-4 and gen["logits_rtol"] == 1e-3
    for p in gen["prompts"]:
        assert p["tokens_equal"] and p["ends_with_eos"] and len(p["torch_tokens"]) < WINDOW
        assert p["onnx_tokens"] == p["torch_tokens"]
        assert len(p["steps"]) == WINDOW  # teacher-forced past EOS: the full window is checked
        assert all(s["passed"] and s["max_abs"] < 1e-4 for s in p["steps"])
    assert "generation: PASSED" in result.output and "EOS at step" in result.output
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "generation_config.json"} <= {p.name for p in out.iterdir()}


def test_every_loop_stops_at_eos_where_transformers_does(trained, reference, tokenizer):
    """normexport's loop, the `generate` command and onnxruntime-genai on Zen prompts: the
    tokens of transformers' generate(), ending in EOS, decoding to the rest of the line."""
    og = pytest.importorskip("onnxruntime_genai")

    out, _, _ = trained
    decoder = OnnxDecoder(out)
    genai = og.Model(str(out))
    for prompt, rest in zen_prompts(tokenizer, 4):
        expected = hf_generate(reference, prompt, WINDOW)
        assert expected[-1] == EOS
        assert decoder.generate(prompt, WINDOW, eos={EOS})[0] == expected
        assert torch_generate(reference, prompt, WINDOW, eos={EOS}) == expected
        assert genai_generate(genai, prompt, WINDOW) == expected
        cli = invoke("generate", out, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", WINDOW)
        assert cli.exit_code == 0, cli.output + cli.stderr
        assert [int(t) for t in cli.output.strip().split(",")] == expected
    longer = invoke("generate", out, "--prompt-ids", "1,40", "--max-new-tokens", 20, "--ignore-eos")
    assert len(longer.output.strip().split(",")) == 20


def copy_trained(dst: Path) -> Path:
    shutil.copytree(TRAINED, dst)
    return dst


def test_generation_config_processors_are_ignored_with_a_note(trained, tmp_path):
    """repetition_penalty, DoLa, min_new_tokens, bad words: not in the graph, not applied by the
    check on either side; it passes and the report names them."""
    out, _, _ = trained
    folder = copy_trained(tmp_path / "m")
    cfg = json.loads((folder / "generation_config.json").read_text())
    cfg.update(repetition_penalty=1.3, dola_layers="low", min_new_tokens=20, bad_words_ids=[[5]])
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    rep = tmp_path / "v.json"
    result = invoke("validate", folder, out, "--report", rep)
    assert result.exit_code == 0, result.output + result.stderr
    gen = strict_json(rep)["generation"]
    assert gen["passed"] and all(p["ends_with_eos"] for p in gen["prompts"])
    ignored = " ".join(gen["ignored_generation_config"])
    for name in ("repetition_penalty=1.3", "dola_layers='low'", "min_new_tokens=20", "bad_words_ids"):
        assert name in ignored
    assert "repetition_penalty" in result.output and "not applied by the check" in result.output


@pytest.mark.parametrize("text, words", [("[1, 2]", "holds a JSON list"), ("{bad", "not a readable JSON file")], ids=["list", "corrupt"])
def test_unreadable_generation_config_is_exit_2(trained, tmp_path, text, words):
    out, _, _ = trained
    folder = copy_trained(tmp_path / "m")
    (folder / "generation_config.json").write_text(text)
    result = invoke("validate", folder, out)
    assert result.exit_code == 2, result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "generation_config.json" in lines[0] and words in lines[0] and lines[1].startswith("hint:")


def test_nan_weights_fail_and_write_nothing(tmp_path):
    """Every logit NaN on both sides: the check fails at the prefill (exit 1), nothing written,
    the report strict JSON."""
    from safetensors.torch import load_file, save_file

    folder = copy_trained(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out, rep = tmp_path / "o", tmp_path / "r.json"
    result = invoke("convert", folder, "-o", out, "--report", rep, "--gen-tokens", 8)
    assert result.exit_code == 1, result.output + result.stderr
    assert not out.exists() and "generation: FAILED" in result.output
    gen = strict_json(rep)["generation"]
    assert not gen["passed"]
    assert gen["failures"][0].startswith("prompt 0, step 0 (prefill): logits NaN on the PyTorch side")
    assert gen["prompts"][0]["steps"][0]["max_abs"] == "inf" and gen["prompts"][0]["steps"][0]["cosine"] == "nan"


def doubled_logits_folder(src: Path, dst: Path) -> Path:
    """A copy of a converted folder whose model.onnx returns 2 x logits (same argmax)."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    producer = next(n for n in model.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_single"
    two = onnx.helper.make_tensor("two", onnx.TensorProto.FLOAT, [], [2.0])
    model.graph.initializer.append(two)
    model.graph.node.append(onnx.helper.make_node("Mul", ["logits_single", "two"], ["logits"]))
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def test_doubled_logits_fail_though_tokens_are_equal(trained, tmp_path):
    out, _, _ = trained
    bad = doubled_logits_folder(out, tmp_path / "doubled")
    rep = tmp_path / "v.json"
    result = invoke("validate", TRAINED, bad, "--report", rep)
    assert result.exit_code == 1, result.output + result.stderr
    gen = strict_json(rep)["generation"]
    assert not gen["passed"]
    assert all(p["tokens_equal"] and not p["logits_passed"] for p in gen["prompts"])
    assert "step 0 (prefill): logits max abs" in gen["failures"][0] and "exceed atol 0.0001" in gen["failures"][0]
    assert abs(gen["prompts"][0]["steps"][0]["max_rel"] - 1.0) < 1e-3  # 100 % off
    # --atol/--rtol apply: a tolerance that admits a factor of two passes the same folder
    loose = invoke("validate", TRAINED, bad, "--rtol", "1.5", "--atol", "0")
    assert loose.exit_code == 0, loose.output + loose.stderr


def test_logit_tolerance_is_enforced_in_the_api(trained, reference):
    """A perturbation of 1e-3 on the logits (under any token flip) fails at fp32's 1e-4 + 1e-3·|x|
    only where it exceeds it: the check is on numbers, not tokens."""
    out, _, _ = trained
    decoder = OnnxDecoder(out)
    run = decoder.session.run

    def shifted(names, feed):
        outs = run(names, feed)
        return [o + np.float32(0.05) if n.name == "logits" else o for n, o in zip(decoder.session.get_outputs(), outs)]

    decoder.session = type("S", (), {"run": staticmethod(shifted), "get_outputs": decoder.session.get_outputs, "get_inputs": decoder.session.get_inputs})()
    report = check_generation(reference, decoder, "float32", 8, seed=3, prompts=1)
    assert not report.passed and report.prompts[0].first_difference is None
    assert report.prompts[0].steps[0].max_abs == pytest.approx(0.05, rel=1e-3)
    assert check_generation(reference, decoder, "float32", 8, seed=3, prompts=1, atol=0.06).passed


def test_one_forward_gives_the_cached_greedy_runs_logits(reference):
    """The check's reference: transformers reading prompt + tokens in one forward without a cache
    gives, step for step, the logits of its own cached greedy loop (prompts of two lengths, two
    of one length batched)."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 384, size=n).tolist() for n in (5, 5, 9)]
    runs = [torch_greedy(reference, p, 12) for p in prompts]
    forced = torch_forced_logits(reference, prompts, [tokens for tokens, _ in runs])
    for (tokens, logits), got in zip(runs, forced):
        assert got.shape == (12, 384)
        np.testing.assert_allclose(got, np.stack(logits), atol=1e-4, rtol=1e-4)
        assert got.argmax(-1).tolist() == tokens


def test_batched_greedy_is_the_one_prompt_loop(trained):
    out, _, _ = trained
    decoder = OnnxDecoder(out)
    rng = np.random.default_rng(12)
    prompts = [rng.integers(3, 384, size=n).tolist() for n in (6, 6, 4)]
    for prompt, (tokens, logits) in zip(prompts, decoder.greedy_batch(prompts, 10)):
        one_tokens, one_logits = decoder.generate(prompt, 10)
        assert tokens == one_tokens
        np.testing.assert_allclose(logits, np.stack(one_logits), atol=1e-4, rtol=1e-4)


def test_a_check_of_no_steps_is_refused(trained, reference):
    """The API with new_tokens 0 would compare nothing: a NormexportError (exit 2 on the CLI), not a pass."""
    from normexport.errors import NormexportError

    out, _, _ = trained
    with pytest.raises(NormexportError, match="nothing would be compared"):
        check_generation(reference, OnnxDecoder(out), "float32", 0, seed=3)


def test_a_check_past_the_context_is_refused_before_any_work(trained, tmp_path):
    """--gen-tokens past max_position_embeddings (128): exit 2 before the export (onnxruntime's
    GroupQueryAttention would fail inside the check); validate of a folder whose context is
    shorter than its check: exit 2, the folder untouched."""
    out = tmp_path / "out"
    assert_refused(invoke("convert", TRAINED, "-o", out, "--gen-tokens", 122), out, "context of 128 positions", "--gen-tokens 121")
    assert invoke("convert", TRAINED, "-o", out, "--gen-tokens", 121).exit_code == 0
    short = tmp_path / "short"
    shutil.copytree(trained[0], short)
    cfg = json.loads((short / "genai_config.json").read_text())
    cfg["model"]["context_length"] = 20
    (short / "genai_config.json").write_text(json.dumps(cfg))
    before = snapshot(short)
    r = invoke("validate", TRAINED, short)
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "context of 20 positions" in r.stderr, r.output + r.stderr
    assert snapshot(short) == before


def test_a_token_flip_fails_in_fp32_at_its_step(trained, reference, tokenizer):
    """ONNX's logits pushed towards another token at decode step 3 only: its greedy answer leaves
    transformers' there, and the check says so (the tokens and that step's logits)."""
    out, _, _ = trained
    decoder = OnnxDecoder(out)
    run, calls = decoder.session.run, []

    def flipped(names, feed):
        outs = run(names, feed)
        calls.append(1)
        if len(calls) == 4:  # the prefill, then decode steps 1, 2, 3
            for n, o in zip(decoder.session.get_outputs(), outs):
                if n.name == "logits":
                    o[:, -1, 200] = o[:, -1].max(-1) + 5.0
        return outs

    decoder.session = type("S", (), {"run": staticmethod(flipped), "get_outputs": decoder.session.get_outputs, "get_inputs": decoder.session.get_inputs})()
    prompt = zen_prompts(tokenizer, 1)[0][0]  # a line's start: EOS comes at its end, long after step 3
    report = check_generation(reference, decoder, "float32", 8, seed=3, prompt_ids=[prompt])
    p = report.prompts[0]
    assert not report.passed and p.first_difference == 3 and p.onnx_tokens[3] == 200
    assert p.torch_tokens[:3] == p.onnx_tokens[:3] and p.torch_tokens[3] != 200 and len(p.torch_tokens) == 4
    assert not p.steps[3].passed and all(s.passed for s in p.steps[:3])
    assert any("greedy tokens differ at step 3" in f and "ONNX 200" in f for f in report.failures())


# ---------------------------------------------------------------------------------------------
# The weights are the checkpoint's


def _assert_exit_2(result, out: Path, *words):
    assert result.exit_code == 2, result.output + result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    for w in words:
        assert w in lines[0], result.stderr
    assert not out.exists()


def test_empty_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    folder = copy_trained(tmp_path / "m")
    save_file({}, str(folder / "model.safetensors"))
    out = tmp_path / "o"
    _assert_exit_2(invoke("convert", folder, "-o", out), out, "do not fit LlamaForCausalLM", "21 missing", "model.embed_tokens.weight")


def test_unexpected_and_reshaped_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_trained(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    state["model.extra.weight"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o"
    _assert_exit_2(invoke("convert", folder, "-o", out), out, "1 unexpected (model.extra.weight)")
    del state["model.extra.weight"]
    state["model.norm.weight"] = torch.ones(32)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _assert_exit_2(invoke("convert", folder, "-o", out), out, "model.norm.weight", "[64]", "[32]")  # config against the weights, before building


def test_tied_weights_are_not_missing(tmp_path):
    """gemma2 ties lm_head to the embedding: its folder holds no lm_head tensor, and loads."""
    from normexport.hf.folder import load_folder

    folder = save_tiny("gemma2", tmp_path / "g")
    hf = load_folder(folder)
    assert hf.module.lm_head.weight.data_ptr() == hf.module.model.embed_tokens.weight.data_ptr()


class TwoNorms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.RMSNorm(16)

    def forward(self, input_ids):
        return self.norm(self.embed(input_ids))


def two_norms_factory():
    return TwoNorms().eval()


def test_factory_state_dict_must_match(tmp_path):
    state = TwoNorms().state_dict()
    state["extra"] = torch.zeros(2)
    del state["norm.weight"]
    torch.save(state, tmp_path / "sd.pt")
    result = invoke("convert", tmp_path / "sd.pt", "--factory", "test_generation_check:two_norms_factory", "--input", "input_ids:int64:1x4", "-o", tmp_path / "o.onnx", cwd=Path(__file__).parent)
    assert result.exit_code == 2, result.output + result.stderr
    assert "missing 1 key(s), e.g. norm.weight" in result.stderr and "unexpected 1 key(s), e.g. extra" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------------------------------------
# TorchScript token ids


class TokenModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(320, 32)
        self.norm = torch.nn.RMSNorm(32)
        self.head = torch.nn.Linear(32, 320)

    def forward(self, input_ids):
        return self.head(self.norm(self.embed(input_ids)))


@pytest.mark.parametrize("how", ["script", "trace", "freeze"])
def test_torchscript_token_ids_index_the_scripted_embedding(tmp_path, how):
    """--input input_ids:int64:1x16 with no range: ids drawn over the 320 rows of the scripted
    (or traced, or frozen) module's embedding, and the check passes."""
    from normexport.inputs import first_vocab_size
    from normexport.load import load_model

    torch.manual_seed(0)
    module = TokenModel().eval()
    ids = torch.zeros(1, 16, dtype=torch.long)
    scripted = {"script": lambda: torch.jit.script(module), "trace": lambda: torch.jit.trace(module, ids), "freeze": lambda: torch.jit.freeze(torch.jit.script(module))}[how]()
    scripted.save(str(tmp_path / "m.pt"))
    assert first_vocab_size(load_model(tmp_path / "m.pt")) == 320
    rep = tmp_path / "r.json"
    result = invoke("convert", tmp_path / "m.pt", "--input", "input_ids:int64:1x16", "-o", tmp_path / "m.onnx", "--no-bench", "--report", rep)
    assert result.exit_code == 0, result.output + result.stderr
    report = strict_json(rep)
    assert report["inputs"][0]["low"] == 0 and report["inputs"][0]["high"] == 320
    assert report["validation"]["passed"]


def test_no_validate_needs_no_range(tmp_path):
    """An embedding lookup with no Embedding module (F.embedding on a parameter): no range is
    found; with nothing compared the export goes ahead; with validation it is asked for."""

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(100, 16))
            self.norm = torch.nn.RMSNorm(16)

        def forward(self, input_ids):
            return self.norm(torch.nn.functional.embedding(input_ids, self.table))

    torch.jit.trace(Functional().eval(), torch.zeros(1, 8, dtype=torch.long)).save(str(tmp_path / "f.pt"))
    ok = invoke("convert", tmp_path / "f.pt", "--input", "input_ids:int64:1x8", "-o", tmp_path / "f.onnx", "--no-validate", "--no-bench")
    assert ok.exit_code == 0, ok.output + ok.stderr
    assert (tmp_path / "f.onnx").is_file()
    asked = invoke("convert", tmp_path / "f.pt", "--input", "input_ids:int64:1x8", "-o", tmp_path / "g.onnx", "--no-bench")
    assert asked.exit_code == 2 and "input_ids:int64:1x8:LOW,HIGH" in asked.stderr


# ---------------------------------------------------------------------------------------------
# Strict JSON


def test_reports_are_strict_json(tmp_path):
    from normexport.report import json_text, strict, write_json

    data = {"a": float("nan"), "b": [float("inf"), -math.inf, np.float32(1.5), np.float64("nan")], "c": np.arange(2)}
    assert strict(data) == {"a": "nan", "b": ["inf", "-inf", 1.5, "nan"], "c": [0, 1]}
    json.loads(json_text(data), parse_constant=lambda name: pytest.fail(name))
    write_json(data, tmp_path / "r.json")
    assert strict_json(tmp_path / "r.json")["b"][0] == "inf"


# ---------------------------------------------------------------------------------------------
# onnxruntime-genai model types


def test_genai_type_mapping():
    from normexport.hf.genai_config import genai_type

    assert genai_type("llama") == "llama" and genai_type("qwen3") == "qwen3" and genai_type("gemma3_text") == "gemma3_text"
    assert genai_type("phi3") == "phi3"
    for unknown in ("qwen2_moe", "mixtral", "helium", "glm", "glm4", "qwen3_moe", "olmo2", "gpt2", "lfm2"):
        assert genai_type(unknown) == "decoder", unknown


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_onnxruntime_genai_runs_every_family(tmp_path, family):
    """Each folder convert writes loads in onnxruntime-genai (its type known, or "decoder") and
    decodes transformers' greedy tokens (up to EOS), MoE models included. With test_hf's
    families (llama, qwen3, gemma2, gemma3, phi3, olmo2, qwen3_moe) that is 19 architectures."""
    og = pytest.importorskip("onnxruntime_genai")
    from normexport.hf.generation import random_prompts
    from normexport.hf.genai_config import genai_type
    from test_hf import load_torch

    folder = save_tiny(family, tmp_path / family)
    out = tmp_path / "out"
    result = invoke("convert", folder, "-o", out, "--gen-tokens", 8)
    assert result.exit_code == 0, result.output + result.stderr
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == genai_type(model_type)
    reference = load_torch(folder)
    genai = og.Model(str(out))
    for prompt in random_prompts(reference.config.vocab_size, 2, 5, seed=99):
        assert genai_generate(genai, prompt, WINDOW) == hf_generate(reference, prompt, WINDOW), family
