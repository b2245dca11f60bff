"""Where the quantized check's default thresholds come from: a trained checkpoint, quantized by
`normexport convert`, measured against transformers in fp32 on many seeds, as it is and with one
MatMulNBits' scales x4, on both of the check's paths:

- the decoder (`convert DIR --quantize KIND`): ``check_quantized_decoder`` on 7 prompt seeds at 16
  and 32 greedy steps;
- the model file (`convert MODEL.pt --quantize KIND`, the checkpoint wrapped as input_ids ->
  logits): 10 draws of two random 24-token sequences, each position's logits row compared.

For every variant it prints the range over the runs of each measure (the near-tie-aware top-1
and top-5 the thresholds bound, the exact top-1 and top-5, mean KL, worst cosine) and how many
runs fail the default thresholds; ``--json`` keeps every run's summary. A correct model should
fail none; a broken one all.

    python bench/calibrate_quant_check.py models/tiny-trained-llama --work /tmp/calib [--kind int4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from quant_helpers import break_scales  # noqa: E402
from trained_tiny import trained_model_file  # noqa: E402

# index among the MatMulNBits nodes in graph order -> what it is in these Llama graphs
BREAKS = {"first-qkv-or-q": 0, "first-o-or-k": 1, "first-mlp-or-v": 2, "last-up": -3, "last-down": -2, "lm-head": -1}
MEASURES = ("top1_agreement", "top1_exact", "top5_overlap", "top5_exact", "kl_mean", "cosine_min")


def convert(*args) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}  # the model file's pickled wrapper lives there
    r = subprocess.run([sys.executable, "-c", "from normexport.cli import main; main()", *map(str, args), "--no-bench", "--keep-failed"], capture_output=True, text=True, env=env)
    if r.returncode not in (0, 1):
        sys.exit(f"convert failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def decoder_runs(module, folder: Path, thresholds) -> list:
    from normexport.hf.generation import OnnxDecoder
    from normexport.quant_check import check_quantized_decoder

    decoder = OnnxDecoder(folder)
    return [check_quantized_decoder(module, decoder, steps, seed, thresholds).summary for seed in range(7) for steps in (16, 32)]


def model_file_runs(wrapped, model: Path, vocab: int) -> list:
    import onnxruntime as ort
    import torch

    from normexport.quant_check import compare_rows, summarize

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = []
    for seed in range(10):
        rng, rows = np.random.default_rng(seed), []
        for _ in range(2):
            ids = rng.integers(3, vocab, size=(2, 24))
            with torch.inference_mode():
                ref = wrapped(torch.from_numpy(ids)).double().numpy()
            rows += compare_rows(ref, session.run(None, {"input_ids": ids})[0])
        out.append(summarize(rows))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a trained Hugging Face causal LM folder (Llama layout)")
    p.add_argument("--work", type=Path, required=True, help="a folder for the converted models")
    p.add_argument("--kind", choices=("int4", "int8"), default="int4")
    p.add_argument("--json", type=Path, help="write every run's summary here")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import transformers

    from normexport.quant_check import DEFAULT_THRESHOLDS, failures

    thresholds = DEFAULT_THRESHOLDS[a.kind]
    vocab = json.loads((a.checkpoint / "config.json").read_text())["vocab_size"]
    a.work.mkdir(parents=True, exist_ok=True)
    decoder = a.work / f"decoder-{a.kind}"
    if not decoder.exists():
        convert("convert", a.checkpoint, "-o", decoder, "--quantize", a.kind)
    pickled = trained_model_file(a.checkpoint, a.work / "model.pt")
    model_file = a.work / f"file-{a.kind}"
    if not (model_file / "model.onnx").exists():
        model_file.mkdir(exist_ok=True)
        convert("convert", pickled, "--trust-pickle", "--input", f"input_ids:int64:2x24:3,{vocab}", "-o", model_file / "model.onnx", "--quantize", a.kind)
    module = transformers.AutoModelForCausalLM.from_pretrained(str(a.checkpoint), local_files_only=True, dtype=torch.float32).eval()
    wrapped = torch.load(pickled, weights_only=False).eval()

    print(f"{a.checkpoint} {a.kind}, thresholds {thresholds}")
    print("| path | scales x4 in | runs | fail | " + " | ".join(MEASURES) + " |")
    print("|---|---|---:|---:|" + "---|" * len(MEASURES))
    every = []
    for variant, pick in {"(none)": None, **BREAKS}.items():
        for path, src in (("decoder", decoder), ("model file", model_file)):
            if pick is not None:
                broken = a.work / f"{src.name}-{variant}"
                if not broken.exists():
                    break_scales(src, broken, pick, 4.0)
                src = broken
            runs = decoder_runs(module, src, thresholds) if path == "decoder" else model_file_runs(wrapped, src / "model.onnx", vocab)
            every += [{"path": path, "break": variant, **dataclasses.asdict(s)} for s in runs]
            ranges = [f"{min(getattr(s, m) for s in runs):.3f}–{max(getattr(s, m) for s in runs):.3f}" for m in MEASURES]
            print(f"| {path} | {variant} | {len(runs)} | {sum(bool(failures(s, thresholds)) for s in runs)} | " + " | ".join(ranges) + " |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(every, indent=1))


if __name__ == "__main__":
    main()
