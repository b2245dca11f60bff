"""Greedy generation over the KV contract on onnxruntime, and the check against transformers.

The check has two parts, on seeded prompts of real token ids drawn across the vocabulary:
- teacher-forced logits: PyTorch (with its own cache) and ONNX consume the same tokens, and
  the logits of the prefill and of every decode step are compared (max abs / rel, cosine);
- free-running greedy tokens: ONNX's loop against ``model.generate(do_sample=False)``. In fp32
  they must be equal token for token. In fp16/bf16 a flip is tolerated only where PyTorch's
  own top-2 logit margin at that step is below the logits' tolerance (a near-tie); a flip on a
  clear margin fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from normexport.errors import NormexportError

NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


class OnnxDecoder:
    """An onnxruntime session over the KV contract: ``step`` runs one forward, ``generate``
    the greedy loop (batch 1)."""

    def __init__(self, model: str | Path, threads: int | None = None, optimize: bool = True, backend=None):
        """``backend``: an onnxruntime backend's record or name (default: the default backend)."""
        import onnxruntime as ort

        from normexport.paths import require_usable_path
        from normexport.runners import DEFAULT_BACKEND, require_onnxruntime

        record = require_onnxruntime(backend or DEFAULT_BACKEND, "the KV-cache decoder")
        path = require_usable_path(model)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise NormexportError(f"{path}: no such ONNX model", "pass the folder `normexport convert` wrote (it holds model.onnx)")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), so, providers=list(record.providers))
        except Exception as e:
            raise NormexportError(f"{path}: onnxruntime cannot load it ({first_line(e, 200)})", "pass a model `normexport convert` wrote") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in self.inputs]
        if missing or not self.past_names or "logits" not in self.output_names:
            raise NormexportError(f"{path} is not a decoder with a KV cache (no {', '.join(missing) or 'past_key_values.*'} input)", "convert with --task text-generation-with-past")
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        past = {}
        for n in self.past_names:
            i = self.inputs[n]
            dtype = NP_DTYPES.get(i.type) or np.float32
            past[n] = np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=dtype)
        return past

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward of ``ids`` [batch, seq] after ``past_len`` cached positions."""
        batch, seq = ids.shape
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
            **past,
        }
        outs = dict(zip(self.output_names, self.session.run(None, feed)))
        return outs["logits"], {p: outs[q] for p, q in zip(self.past_names, self.present_names)}

    def generate(self, prompt: list[int], max_new_tokens: int, forced: list[int] | None = None) -> tuple[list[int], list[np.ndarray]]:
        """Greedy tokens and the last-position logits of every step. With ``forced`` the
        loop feeds those tokens instead of its own choices (teacher forcing)."""
        past, n = self.empty_past(), 0
        ids = np.asarray([prompt], dtype=np.int64)
        tokens, logits = [], []
        for i in range(max_new_tokens):
            step_logits, past = self.step(ids, past, n)
            last = step_logits[0, -1].astype(np.float32)
            logits.append(last)
            tokens.append(int(last.argmax()))
            n += ids.shape[1]
            ids = np.asarray([[forced[i] if forced is not None else tokens[-1]]], dtype=np.int64)
        return tokens, logits


def torch_generate(module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generation (do_sample=False), exactly max_new_tokens long."""
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = module.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, pad_token_id=0, num_beams=1, top_k=None, top_p=None, temperature=None,
        )
    return out[0, len(prompt):].tolist()


def torch_step_logits(module, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Last-position logits of the prefill and of each decode step fed ``tokens[:-1]``, with
    transformers' own DynamicCache."""
    import torch
    from transformers import DynamicCache

    from normexport.hf.kv_export import cache_kwarg, output_cache

    key = cache_kwarg(module)
    cache = DynamicCache()
    ids = torch.tensor([prompt])
    n, out = 0, []
    with torch.inference_mode():
        for i in range(len(tokens)):
            pos = torch.arange(n, n + ids.shape[1]).unsqueeze(0)
            res = module(input_ids=ids, attention_mask=torch.ones(1, n + ids.shape[1], dtype=torch.int64), position_ids=pos, use_cache=True, **{key: cache})
            out.append(res.logits[0, -1].float().numpy())
            cache = output_cache(res)
            n += ids.shape[1]
            ids = torch.tensor([[tokens[i]]])
    return out


def random_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    """Real token ids drawn across the whole vocabulary."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=length).tolist() for _ in range(count)]


@dataclass
class StepComparison:
    step: int  # 0 = prefill
    max_abs: float
    max_rel: float
    cosine: float


@dataclass
class PromptResult:
    prompt: list[int]
    torch_tokens: list[int]
    onnx_tokens: list[int]
    steps: list[StepComparison]
    first_difference: int | None = None  # step index where the greedy tokens first differ
    margin: float | None = None  # PyTorch's top-2 logit margin at that step
    tolerated: bool = False  # a flip on a margin below the tolerance

    @property
    def passed(self) -> bool:
        return self.first_difference is None or self.tolerated


@dataclass
class GenerationReport:
    dtype: str
    new_tokens: int
    tolerance: float
    prompts: list[PromptResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.prompts)

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "dtype": self.dtype,
            "new_tokens": self.new_tokens,
            "margin_tolerance": self.tolerance,
            "prompts": [
                {
                    "prompt": p.prompt, "torch_tokens": p.torch_tokens, "onnx_tokens": p.onnx_tokens,
                    "tokens_equal": p.first_difference is None, "first_difference": p.first_difference,
                    "top2_margin_at_difference": p.margin, "tolerated": p.tolerated,
                    "steps": [vars(s) for s in p.steps],
                }
                for p in self.prompts
            ],
            "notes": self.notes,
        }


def flip_tolerated(dtype: str, margin: float, tolerance: float, logit_error: float) -> bool:
    """A greedy token may flip in fp16/bf16 only where PyTorch's top-2 margin is within the
    logits' tolerance or within twice the measured logit error at that step; fp32 never."""
    return dtype != "float32" and margin <= max(tolerance, 2 * logit_error)


def compare_step(step: int, ref: np.ndarray, got: np.ndarray) -> StepComparison:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(ref - got)
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    cos = float(ref @ got / max(np.linalg.norm(ref) * np.linalg.norm(got), 1e-30))
    return StepComparison(step, float(diff.max()), float(rel.max()), cos)


def check_generation(module, decoder: OnnxDecoder, dtype: str, new_tokens: int, seed: int, prompts: int = 2, prompt_len: int = 7) -> GenerationReport:
    """Teacher-forced logits per step and free-running greedy tokens, ONNX vs transformers."""
    from normexport.hf.folder import quiet_transformers
    from normexport.validate import DEFAULT_TOLERANCES

    with quiet_transformers():
        return _check_generation(module, decoder, dtype, new_tokens, seed, prompts, prompt_len, DEFAULT_TOLERANCES)


def _check_generation(module, decoder, dtype, new_tokens, seed, prompts, prompt_len, tolerances) -> GenerationReport:
    vocab = decoder.session.get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else module.config.get_text_config(decoder=True).vocab_size
    tolerance = tolerances[dtype][0] * 10 if dtype != "float32" else 0.0
    report = GenerationReport(dtype, new_tokens, tolerance)
    for prompt in random_prompts(vocab, prompts, prompt_len, seed):
        ref_tokens = torch_generate(module, prompt, new_tokens)
        ref_logits = torch_step_logits(module, prompt, ref_tokens)
        _, forced_logits = decoder.generate(prompt, new_tokens, forced=ref_tokens)
        onnx_tokens, _ = decoder.generate(prompt, new_tokens)
        steps = [compare_step(i, r, g) for i, (r, g) in enumerate(zip(ref_logits, forced_logits))]
        result = PromptResult(prompt, ref_tokens, onnx_tokens, steps)
        diff = next((i for i, (a, b) in enumerate(zip(ref_tokens, onnx_tokens)) if a != b), None)
        if diff is not None:
            top2 = np.sort(ref_logits[diff])[-2:]
            result.first_difference, result.margin = diff, float(top2[1] - top2[0])
            result.tolerated = flip_tolerated(dtype, result.margin, tolerance, steps[diff].max_abs)
        report.prompts.append(result)
    if dtype == "float32":
        report.notes.append("float32: greedy tokens must equal transformers' token for token")
    return report
