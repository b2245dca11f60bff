"""Prefill and per-token decode latency of one Hugging Face decoder, by attention form (generic, fused, GroupQueryAttention) against onnxruntime-genai's builder fp32, same threads:

  torch eager       transformers with its DynamicCache (inference_mode)
  onnx unfused      normexport's KV-cache export before fusion, on onnxruntime
  onnx fused        the same after the RMSNorm fusion (`convert DIR --attention generic --no-attention-fusion`)
  onnx fused + attn the norms, then onnxruntime's rotary/attention fusions (`convert DIR --attention generic`)
  onnx GQA          one GroupQueryAttention per layer, the norms fused (what `convert DIR` writes)
  genai (ours)      onnxruntime-genai running normexport's generic and GroupQueryAttention folders
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
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_decoder import print_ops  # noqa: E402
from common import machine_line  # noqa: E402

from normexport.hf.timing import run_genai  # noqa: E402


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


def build_onnx(folder: Path, work: Path) -> tuple[Path, Path, Path, Path]:
    """(unfused model.onnx, norm-fused folder, norm+attention-fused folder, GroupQueryAttention
    folder) from normexport."""
    from normexport.fuse import save_onnx
    from normexport.hf.convert import HFOptions, convert_folder
    from normexport.hf.folder import load_folder
    from normexport.hf.kv_export import export_decoder
    from normexport.options import ConvertOptions, FuseOptions

    exp = export_decoder(load_folder(folder))
    unfused = work / "unfused" / "model.onnx"
    save_onnx(exp.model, unfused)
    folders = []
    for name, attention, op in (("fused", False, "generic"), ("fused-attention", True, "generic"), ("gqa", None, "gqa")):
        report = convert_folder(folder, ConvertOptions(fuse=FuseOptions(residual=False), output=work / name), HFOptions(gen_tokens=8, attention_fusion=attention, attention=op))
        assert report.passed and report.written, report.to_json()
        folders.append(work / name)
    return unfused, *folders


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
    from normexport.hf.timing import interleave, run_ort, run_torch

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-decoder-"))
    try:
        folder = work / "llama"
        save_folder(folder, a)
        unfused, fused, fused_attn, gqa = build_onnx(folder, work)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()
        prompt = np.random.default_rng(0).integers(3, a.vocab, size=a.prompt).tolist()
        reference = torch_generate(model, prompt, a.new)
        variants = {
            "torch eager (DynamicCache)": lambda: run_torch(model, prompt, a.new),
            "onnx unfused (onnxruntime)": (lambda d: lambda: run_ort(d, prompt, a.new))(OnnxDecoder(unfused, threads=a.threads)),
            "onnx fused norms (onnxruntime)": (lambda d: lambda: run_ort(d, prompt, a.new))(OnnxDecoder(fused, threads=a.threads)),
            "onnx fused norms + rotary/attention (onnxruntime)": (lambda d: lambda: run_ort(d, prompt, a.new))(OnnxDecoder(fused_attn, threads=a.threads)),
            "onnx GroupQueryAttention + fused norms (onnxruntime)": (lambda d: lambda: run_ort(d, prompt, a.new))(OnnxDecoder(gqa, threads=a.threads)),
        }
        graphs = {"onnx unfused": unfused, "onnx fused norms": fused / "model.onnx", "onnx fused norms + rotary/attention": fused_attn / "model.onnx", "onnx GroupQueryAttention": gqa / "model.onnx"}
        try:
            import onnxruntime_genai as og
        except ImportError:
            og = None
            print("onnxruntime-genai is not installed: its rows are left out (pip install onnxruntime-genai)")
        if og is not None:
            set_genai_threads(fused_attn, a.threads)
            set_genai_threads(gqa, a.threads)
            variants["onnxruntime-genai, normexport's generic folder"] = (lambda m: lambda: run_genai(og, m, prompt, a.new))(og.Model(str(fused_attn)))
            variants["onnxruntime-genai, normexport's GroupQueryAttention folder"] = (lambda m: lambda: run_genai(og, m, prompt, a.new))(og.Model(str(gqa)))
            built = build_genai(folder, work / "genai-builder")
            if built is not None:
                set_genai_threads(built, a.threads)
                variants["onnxruntime-genai, its builder"] = (lambda m: lambda: run_genai(og, m, prompt, a.new))(og.Model(str(built)))
                graphs["onnxruntime-genai builder"] = built / "model.onnx"
        timings = interleave(variants, a.rounds)
        print(f"\n{machine_line(a.threads)}")
        print(f"Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, fp32; prompt {a.prompt} tokens, {a.new} new tokens, batch 1; median of {a.rounds} rounds\n")
        print("| variant | prefill ms | decode ms/token (median) | decode ms/token (min) | greedy tokens = transformers |")
        print("|---|---:|---:|---:|---|")
        for t in timings:
            print(f"| {t.name} | {t.prefill_ms:.2f} | {t.decode_ms:.3f} | {min(r[1] for r in t.runs) * 1e3:.3f} | {'yes' if t.tokens_equal(reference) else 'no'} |")
        print_ops(graphs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
