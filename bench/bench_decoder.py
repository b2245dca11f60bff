"""Prefill and per-token decode latency of one Hugging Face decoder, five ways, same threads:

  torch eager       transformers with its DynamicCache (inference_mode)
  onnx unfused      normexport's KV-cache export before fusion, on onnxruntime
  onnx fused        the same after the RMSNorm fusion (what `normexport convert DIR` writes)
  genai (ours)      onnxruntime-genai running normexport's folder
  genai builder     onnxruntime-genai's own model builder on the same folder (fp32, cpu)

A randomly initialised Llama folder (with a word-level tokenizer, which the builder needs) is
saved with save_pretrained; nothing is downloaded. Rounds interleave the variants; the table
gives medians over rounds, and whether each variant's greedy tokens equal transformers'.

    python bench/bench_decoder.py [--hidden 256 --layers 4 --vocab 8000 --prompt 64 --new 32 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine_line  # noqa: E402


def save_folder(folder: Path, a) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 32 * 32, num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 32, num_key_value_heads=max(1, a.hidden // 64), head_dim=32,
        max_position_embeddings=max(512, 2 * (a.prompt + a.new)), pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(a.vocab)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2").save_pretrained(folder)


def build_onnx(folder: Path, work: Path) -> tuple[Path, Path]:
    """(unfused model.onnx, fused folder) from normexport's export and fusion."""
    from normexport.fuse import fuse_model, save_onnx
    from normexport.hf.convert import HFOptions, convert_folder
    from normexport.hf.folder import load_folder
    from normexport.hf.kv_export import export_decoder
    from normexport.options import ConvertOptions, FuseOptions

    exp = export_decoder(load_folder(folder), work)
    unfused = work / "unfused" / "model.onnx"
    save_onnx(exp.model, unfused)
    fused = work / "fused"
    report = convert_folder(folder, ConvertOptions(fuse=FuseOptions(residual=False), output=fused), HFOptions(gen_tokens=8))
    assert report.passed and report.written, report.to_json()
    return unfused, fused


def build_genai(folder: Path, out: Path) -> Path | None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "builder-cache")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"onnxruntime-genai builder failed: {r.stderr.strip().splitlines()[-1:]}")
        return None
    return out


def set_genai_threads(folder: Path, threads: int) -> None:
    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    path.write_text(json.dumps(cfg, indent=2))


def run_torch(model, prompt, new):
    import torch
    from transformers import DynamicCache

    from normexport.hf.kv_export import cache_kwarg, output_cache

    key = cache_kwarg(model)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **{key: DynamicCache()})
        prefill = time.perf_counter() - t
        tokens = [int(out.logits[0, -1].argmax())]
        t = time.perf_counter()
        for _ in range(new - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{key: output_cache(out)})
            tokens.append(int(out.logits[0, -1].argmax()))
        decode = (time.perf_counter() - t) / (new - 1)
    return prefill, decode, tokens


def run_ort(decoder, prompt, new):
    import numpy as np

    ids = np.asarray([prompt], dtype=np.int64)
    t = time.perf_counter()
    logits, past = decoder.step(ids, decoder.empty_past(), 0)
    prefill = time.perf_counter() - t
    tokens, n = [int(logits[0, -1].argmax())], len(prompt)
    t = time.perf_counter()
    for _ in range(new - 1):
        logits, past = decoder.step(np.asarray([[tokens[-1]]], dtype=np.int64), past, n)
        tokens.append(int(logits[0, -1].argmax()))
        n += 1
    return prefill, (time.perf_counter() - t) / (new - 1), tokens


def run_genai(og, model, prompt, new):
    import numpy as np

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new, min_length=len(prompt) + new)
    gen = og.Generator(model, params)
    t = time.perf_counter()
    gen.append_tokens(np.asarray([prompt], dtype=np.int32))  # the prompt's forward runs here
    gen.generate_next_token()
    prefill = time.perf_counter() - t
    tokens = [int(gen.get_next_tokens()[0])]
    t = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return prefill, (time.perf_counter() - t) / max(1, len(tokens) - 1), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()

    import numpy as np
    import torch
    import transformers

    from normexport.hf.generation import OnnxDecoder, torch_generate

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-decoder-"))
    try:
        folder = work / "llama"
        save_folder(folder, a)
        unfused, fused = build_onnx(folder, work)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()
        prompt = np.random.default_rng(0).integers(3, a.vocab, size=a.prompt).tolist()
        reference = torch_generate(model, prompt, a.new)
        variants = {
            "torch eager (DynamicCache)": lambda: run_torch(model, prompt, a.new),
            "onnx unfused (onnxruntime)": (lambda d: lambda: run_ort(d, prompt, a.new))(OnnxDecoder(unfused, threads=a.threads)),
            "onnx fused (onnxruntime)": (lambda d: lambda: run_ort(d, prompt, a.new))(OnnxDecoder(fused, threads=a.threads)),
        }
        try:
            import onnxruntime_genai as og
        except ImportError:
            og = None
            print("onnxruntime-genai is not installed: its rows are left out (pip install onnxruntime-genai)")
        if og is not None:
            set_genai_threads(fused, a.threads)
            variants["onnxruntime-genai, normexport's folder"] = (lambda m: lambda: run_genai(og, m, prompt, a.new))(og.Model(str(fused)))
            built = build_genai(folder, work / "genai-builder")
            if built is not None:
                set_genai_threads(built, a.threads)
                variants["onnxruntime-genai, its builder"] = (lambda m: lambda: run_genai(og, m, prompt, a.new))(og.Model(str(built)))
        results = {k: [] for k in variants}
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(a.rounds):
            for name, fn in variants.items():
                results[name].append(fn())
        print(f"\n{machine_line(a.threads)}")
        print(f"Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, fp32; prompt {a.prompt} tokens, {a.new} new tokens, batch 1; median of {a.rounds} rounds\n")
        print("| variant | prefill ms | decode ms/token | greedy tokens = transformers |")
        print("|---|---:|---:|---|")
        for name, runs in results.items():
            pre = statistics.median(r[0] for r in runs) * 1e3
            dec = statistics.median(r[1] for r in runs) * 1e3
            same = all(r[2] == reference for r in runs)
            print(f"| {name} | {pre:.2f} | {dec:.3f} | {'yes' if same else 'no'} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
