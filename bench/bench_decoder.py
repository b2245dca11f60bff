"""Prefill and per-token decode latency of one Hugging Face decoder, fp32 and int4, normexport
against onnxruntime-genai's model builder, same threads, interleaved rounds:

  torch eager             transformers with its DynamicCache (inference_mode)
  onnx fp32 / int4        normexport's folders (`convert DIR`, and the same fused graph through
                          normexport.quantize: what `convert DIR --quantize int4` writes) on
                          normexport's onnxruntime loop
  genai ours fp32 / int4  onnxruntime-genai running those folders
  genai builder fp32/int4 onnxruntime-genai's builder (`-p fp32|int4 -e cpu`, its defaults) on the
                          same source folder, run by onnxruntime-genai

``--shape`` picks the model: ``llama`` (hidden 256, 4 layers, vocabulary 32000) or ``qwen2-0.5b``
(Qwen2-0.5B's shapes: hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocabulary
151936). Embeddings are untied unless ``--tied`` (Qwen2-0.5B itself ties them: both tools then
store the table once, in int4 for int4, read by the LM head and the embedding). Random weights
from the config with a word-level tokenizer (the builder needs one); nothing is downloaded.
Rounds interleave the variants; the table gives medians over rounds of wall time, the CPU time
per generated token (process time over the whole run / new tokens), the model files' size, and
whether greedy tokens equal transformers' (fp32 must; int4 is measured by the quantized check).
With ``--all`` the older variants (unfused, norms without attention fusion) are timed too; with
``--folded`` normexport's folders with the residual Adds folded into the norms as well, with
``--packed-mlp`` those with the gate/up MatMuls packed into one (onnxruntime's fusion passes,
``--attention-fusion``). normexport's decoders output each row's last token's logits (the
prefill's LM head reads one position); the builder's default computes every position's, and
``--builder-pruned`` adds its folders built with ``prune_lm_head=true``, which does the same.

    python bench/bench_decoder.py [--shape llama|qwen2-0.5b] [--prompt 64 --new 32 --threads 1 --rounds 7] [--folded] [--packed-mlp] [--tied] [--builder-pruned]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine_line  # noqa: E402


SHAPES = {
    "llama": dict(cls="Llama", vocab=32000, hidden=256, layers=4, heads=8, kv_heads=4, head_dim=32, mlp=672),
    "qwen2-0.5b": dict(cls="Qwen2", vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64, mlp=4864),
}


def save_folder(folder: Path, shape: dict, a) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = getattr(transformers, f"{shape['cls']}Config")(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
        max_position_embeddings=max(512, 2 * (a.prompt + a.new)), pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=a.tied,
    )
    torch.manual_seed(0)
    getattr(transformers, f"{shape['cls']}ForCausalLM")(cfg).save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(shape["vocab"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2").save_pretrained(folder)


# normexport layouts beside the default: name suffix -> (residual fusion, attention_fusion)
LAYOUTS = {"": (False, None), " folded": (True, None), " packed MLP": (False, True)}


def build_ours(folder: Path, work: Path, all_variants: bool, layouts: tuple[str, ...] = ("",)) -> dict[str, Path]:
    """normexport's folders: fp32 (`convert DIR`, checked against transformers), int4 (the same
    fused graph through normexport.quantize, as `convert --quantize int4` does after the fusion)
    and, with --all, the unfused export and the norms-only folder. Returns name -> folder, with
    the seconds each step took in STEPS. ``layouts``: the LAYOUTS to build, each as fp32 and int4
    ("fp32 folded": the residual Adds folded into the norms, ``--residual-fusion on``:
    SkipSimplifiedLayerNormalization; "fp32 packed MLP": onnxruntime's fusion passes run on the
    GroupQueryAttention graph, which pack the gate/up MatMuls)."""
    import onnx_ir as ir

    from normexport.fuse import save_onnx
    from normexport.hf.convert import HFOptions, convert_folder
    from normexport.options import ConvertOptions, FuseOptions, ValidateOptions
    from normexport.quantize import QuantizeOptions, quantize_model

    out = {}
    for suffix in layouts:
        residual, attention_fusion = LAYOUTS[suffix]
        fp32, int4 = work / f"fp32{suffix.replace(' ', '-')}", work / f"int4{suffix.replace(' ', '-')}"
        t0 = time.process_time()
        report = convert_folder(folder, ConvertOptions(fuse=FuseOptions(residual=residual), validate=ValidateOptions(threads=1), output=fp32), HFOptions(gen_tokens=4, attention_fusion=attention_fusion))
        assert report.passed and report.written, report.to_json()
        STEPS[f"normexport convert fp32{suffix} (export+fuse+check), CPU s"] = time.process_time() - t0
        out[f"fp32{suffix}"] = fp32
        t0 = time.process_time()
        shutil.copytree(fp32, int4, ignore=shutil.ignore_patterns("model.onnx*"))
        quantized, qreport = quantize_model(ir.load(str(fp32 / "model.onnx")), QuantizeOptions("int4"))
        save_onnx(quantized, int4 / "model.onnx")
        del quantized
        STEPS[f"normexport quantize int4{suffix}, CPU s"] = time.process_time() - t0
        print(f"normexport int4{suffix}: {qreport.summary()}")
        out[f"int4{suffix}"] = int4
    if all_variants:
        from normexport.hf.folder import load_folder
        from normexport.hf.kv_export import export_decoder

        save_onnx(export_decoder(load_folder(folder)).model, work / "unfused" / "model.onnx")
        out["unfused"] = work / "unfused"
        r = convert_folder(folder, ConvertOptions(fuse=FuseOptions(residual=False), output=work / "fused-norms"), HFOptions(gen_tokens=4, attention_fusion=False))
        assert r.passed and r.written, r.to_json()
        out["fused norms only"] = work / "fused-norms"
    return out


def build_genai(folder: Path, out: Path, precision: str, extra: tuple[str, ...] = ()) -> Path | None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / f"builder-cache-{precision}")]
    if extra:
        cmd += ["--extra_options", *extra]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"onnxruntime-genai builder ({precision}) failed: {r.stderr.strip().splitlines()[-1:]}")
        return None
    STEPS[f"builder {precision}{' ' + ' '.join(extra) if extra else ''} (wall s; CPU not measured in the subprocess)"] = time.time() - t0
    return out


STEPS: dict[str, float] = {}


def with_cpu(run):
    """A Run plus the process CPU seconds it took, per generated token."""
    def timed():
        c = time.process_time()
        prefill, decode, tokens = run()
        return prefill, decode, tokens, (time.process_time() - c) / max(1, len(tokens))
    return timed


def print_ops(graphs: dict[str, Path]) -> None:
    """Each graph's nodes by op type (the ops it runs per step)."""
    import onnx

    from normexport.hf.ort_attention import op_counts

    import onnx_ir as ir

    counts = {name: op_counts(ir.from_proto(onnx.load(str(path), load_external_data=False))) for name, path in graphs.items()}
    ops = sorted({op for c in counts.values() for op in c}, key=lambda op: -max(c.get(op, 0) for c in counts.values()))
    print("\n| op | " + " | ".join(counts) + " |")
    print("|---|" + "---:|" * len(counts))
    print("| **nodes** | " + " | ".join(str(sum(c.values())) for c in counts.values()) + " |")
    for op in ops:
        print(f"| {op} | " + " | ".join(str(c.get(op, 0)) for c in counts.values()) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="llama")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--all", action="store_true", help="also the unfused export and the norms-only folder")
    p.add_argument("--folded", action="store_true", help="also normexport's folders with the residual Adds folded into the norms (--residual-fusion on)")
    p.add_argument("--packed-mlp", action="store_true", help="also normexport's folders with the gate/up MatMuls packed (onnxruntime's fusion passes, --attention-fusion)")
    p.add_argument("--builder-pruned", action="store_true", help="also the builder's folders with its prune_lm_head extra option (the LM head on the last position only, as normexport's default)")
    p.add_argument("--tied", action="store_true", help="tie the LM head to the embedding table (tie_word_embeddings, as Qwen2-0.5B does)")
    p.add_argument("--precisions", default="fp32,int4", help="which of normexport's and the builder's folders to time (fp32 is built anyway: int4 is made from it)")
    a = p.parse_args()

    import statistics

    import numpy as np
    import torch
    import transformers

    from normexport.hf.generation import OnnxDecoder, torch_generate
    from normexport.hf.timing import folder_bytes, genai_view, run_genai, run_ort, run_torch

    shape = SHAPES[a.shape]
    torch.set_num_threads(a.threads)
    print(machine_line(a.threads))
    work = Path(tempfile.mkdtemp(prefix="bench-decoder-"))
    try:
        folder = work / "hf"
        save_folder(folder, shape, a)
        layouts = ("", *((" folded",) if a.folded else ()), *((" packed MLP",) if a.packed_mlp else ()))
        ours = build_ours(folder, work, a.all, layouts)
        precisions = [x for x in a.precisions.split(",") if x]
        ours = {n: path for n, path in ours.items() if n.split(" ")[0] in precisions or n.split(" ")[0] not in ("fp32", "int4")}
        genai_ours = [n for n in ours if n.split(" ")[0] in precisions]
        builder = {prec: build_genai(folder, work / f"builder-{prec}", prec) for prec in precisions}
        if a.builder_pruned:
            builder.update({f"{prec} pruned": build_genai(folder, work / f"builder-{prec}-pruned", prec, ("prune_lm_head=true",)) for prec in precisions})
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()
        prompt = np.random.default_rng(0).integers(3, shape["vocab"], size=a.prompt).tolist()
        reference = torch_generate(model, prompt, a.new)
        variants = {"torch eager (DynamicCache)": with_cpu(lambda: run_torch(model, prompt, a.new))}
        sizes = {}
        for name, path in ours.items():
            variants[f"normexport {name} (onnxruntime loop)"] = with_cpu((lambda d: lambda: run_ort(d, prompt, a.new))(OnnxDecoder(path, threads=a.threads)))
            sizes[f"normexport {name} (onnxruntime loop)"] = folder_bytes(path)
        try:
            import onnxruntime_genai as og
        except ImportError:
            og = None
            print("onnxruntime-genai is not installed: its rows are left out (pip install onnxruntime-genai)")
        graphs = {f"normexport {n}": path / "model.onnx" for n, path in ours.items()}
        if og is not None:
            for label, path in [*((f"normexport {n}", ours[n]) for n in genai_ours), *((f"builder {prec}", b) for prec, b in builder.items() if b is not None)]:
                name = f"onnxruntime-genai, {label}"
                variants[name] = with_cpu((lambda m: lambda: run_genai(og, m, prompt, a.new))(og.Model(str(genai_view(path, a.threads, work / "views" / label.replace(" ", "-"))))))
                sizes[name] = folder_bytes(path)
            graphs.update({f"builder {prec}": b / "model.onnx" for prec, b in builder.items() if b is not None})
        runs = {name: [] for name in variants}
        for fn in variants.values():
            fn()
        for _ in range(a.rounds):
            for name, fn in variants.items():
                runs[name].append(fn())
        print(f"\n{machine_line(a.threads)}")
        print(f"{a.shape}: {shape}{', tied embeddings' if a.tied else ''}; fp32 source; prompt {a.prompt} tokens, {a.new} new tokens, batch 1; median (min) of {a.rounds} rounds\n")
        print("| variant | prefill ms | decode ms/token | CPU ms/token (whole run) | model MB | greedy tokens = transformers |")
        print("|---|---:|---:|---:|---:|---|")
        for name, rs in runs.items():
            pre = [r[0] * 1e3 for r in rs]
            dec = [r[1] * 1e3 for r in rs]
            cpu = [r[3] * 1e3 for r in rs]
            same = all(r[2] == reference for r in rs)
            size = f"{sizes[name] / 1e6:.1f}" if name in sizes else "-"
            print(f"| {name} | {statistics.median(pre):.2f} ({min(pre):.2f}) | {statistics.median(dec):.3f} ({min(dec):.3f}) | {statistics.median(cpu):.3f} | {size} | {'yes' if same else 'no'} |")
        print("\n| step | seconds |\n|---|---:|")
        for k, v in STEPS.items():
            print(f"| {k} | {v:.1f} |")
        print_ops(graphs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
