"""Prefill and per-token decode latency of a KV-cache decoder, in interleaved rounds.

A run feeds the prompt (prefill: one forward over ``prompt`` tokens from an empty cache),
then decodes ``new - 1`` greedy tokens one at a time, each after the growing past; it returns
(prefill seconds, mean decode seconds per token, greedy tokens). ``interleave`` runs every
variant once per round, after one warm-up each, so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

Run = tuple[float, float, list[int]]


def run_torch(model, prompt: list[int], new: int) -> Run:
    """transformers eager with its DynamicCache."""
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
        decode = (time.perf_counter() - t) / max(1, new - 1)
    return prefill, decode, tokens


def run_ort(decoder, prompt: list[int], new: int) -> Run:
    """normexport's onnxruntime loop (generation.OnnxDecoder) over the KV contract."""
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
    return prefill, (time.perf_counter() - t) / max(1, new - 1), tokens


def run_genai(og, model, prompt: list[int], new: int) -> Run:
    """onnxruntime-genai's greedy loop (its own KV-cache handling) over ``model`` (og.Model)."""
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


def genai_view(folder, threads: int, work) -> Path:
    """A folder onnxruntime-genai loads as ``folder`` with ``threads`` intra-op threads: its
    files linked, genai_config.json copied with the session options set (``folder`` untouched)."""
    import json
    import os

    view = Path(work) / f"genai-{Path(folder).name}"
    view.mkdir(parents=True)
    for f in Path(folder).iterdir():
        if f.name != "genai_config.json":
            os.symlink(f.resolve(), view / f.name)
    cfg = json.loads((Path(folder) / "genai_config.json").read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"], opts["inter_op_num_threads"] = threads, 1
    (view / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return view


def folder_bytes(folder) -> int:
    """Bytes of a decoder folder's model files (.onnx and external data)."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and (f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data")))


@dataclass
class Timing:
    name: str
    runs: list[Run] = field(default_factory=list)
    quantized: str | None = None  # int4 / int8: its tokens are not expected to equal the reference
    size_bytes: int | None = None  # the model files, where the variant is a folder

    @property
    def prefill_ms(self) -> float:
        return statistics.median(r[0] for r in self.runs) * 1e3

    @property
    def decode_ms(self) -> float:
        return statistics.median(r[1] for r in self.runs) * 1e3

    def tokens_equal(self, reference: list[int]) -> bool:
        return all(r[2] == reference for r in self.runs)

    def to_json(self, reference: list[int] | None = None) -> dict:
        out = {"variant": self.name, "prefill_ms": round(self.prefill_ms, 4), "decode_ms_per_token": round(self.decode_ms, 4), "rounds": len(self.runs)}
        if reference is not None:
            out["tokens_equal_reference"] = self.tokens_equal(reference)
        if self.quantized:
            out["quantized"] = self.quantized
        if self.size_bytes is not None:
            out["size_mb"] = round(self.size_bytes / 1e6, 2)
        return out


def interleave(variants: dict[str, Callable[[], Run]], rounds: int, warmup: int = 1) -> list[Timing]:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing(name) for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            timings[name].runs.append(fn())
    return list(timings.values())
