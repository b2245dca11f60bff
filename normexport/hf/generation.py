"""Greedy generation over the KV contract on onnxruntime, and the check against transformers.

Both sides decode with one rule: plain greedy argmax of the raw logits, stopping after an EOS
token (the model's ``eos_token_id``, one id or several). ``generate()`` is not called, so
nothing from ``generation_config.json`` (repetition penalties, DoLa, min length, bad words,
sampling, ...) takes part: those logits processors are not in an exported graph either, and the
report names the ones the folder sets as ignored.

The check, on seeded prompts of real token ids drawn across the vocabulary:
- the ONNX decoder generates greedily for N steps with its KV cache (past an EOS too, so a
  short answer still checks every step), prompts of one length batched together;
- transformers' model then reads each prompt and the ONNX tokens in one forward without a
  cache (its logits at every position: the reference of every step, teacher-forced on the same
  tokens);
- per-step logits, enforced: the prefill's and every decode step's must satisfy
  |onnx - torch| <= atol + rtol·|torch| (defaults by dtype from normexport.validate,
  ``--atol/--rtol`` apply); NaN or Inf on either side fails, naming the step. Equal tokens
  never excuse wrong logits;
- greedy tokens, up to and including the ONNX answer's EOS: at every step transformers' argmax
  must be the ONNX token. Where it is at every step, the ONNX answer is transformers' greedy
  answer token for token (each step sees the same prefix on both sides); at the first step
  where it is not, transformers' answer is known up to that step. In fp32 a difference fails.
  In fp16/bf16 it is tolerated only where PyTorch's own top-2 logit margin at that step is
  below the logits' tolerance (a near-tie); a flip on a clear margin fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from normexport.errors import NormexportError, first_line

NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


class OnnxDecoder:
    """An onnxruntime session over the KV contract: ``step`` runs one forward, ``generate``
    the greedy loop (batch 1), ``greedy_batch`` the loop over several prompts."""

    def __init__(self, model: str | Path, threads: int | None = None, optimize: bool = True, backend=None, spinning: bool = True):
        """``backend``: an onnxruntime backend's record or name (default: the default backend).
        ``spinning=False``: idle intra-op threads sleep instead of spinning (the same results;
        less CPU time burnt where latency is not what is measured)."""
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
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), so, providers=list(record.providers))
        except Exception as e:
            raise NormexportError(f"{path}: onnxruntime cannot load it ({first_line(e, 200)})", "pass a model `normexport convert` wrote") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        missing = [n for n in ("input_ids", "attention_mask") if n not in self.inputs]
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
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64), **past}
        if "position_ids" in self.inputs:  # a GroupQueryAttention graph takes the positions from the mask
            feed["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
        outs = dict(zip(self.output_names, self.session.run(None, feed)))
        return outs["logits"], {p: outs[q] for p, q in zip(self.past_names, self.present_names)}

    def generate(self, prompt: list[int], max_new_tokens: int, forced: list[int] | None = None, eos: set[int] | frozenset = frozenset()) -> tuple[list[int], list[np.ndarray]]:
        """Greedy tokens (argmax of the raw logits) and the last-position logits of every
        step; the loop stops after a token in ``eos``. With ``forced`` it feeds those tokens
        instead of its own choices (teacher forcing, for ``len(forced)`` steps at most)."""
        steps = max_new_tokens if forced is None else min(max_new_tokens, len(forced))
        feed = None if forced is None else np.asarray([forced[:steps]], dtype=np.int64)
        tokens, logits = self._loop(np.asarray([prompt], dtype=np.int64), steps, feed, eos if forced is None else frozenset())
        return [int(t[0]) for t in tokens], [row[0] for row in logits]

    def greedy_batch(self, prompts: list[list[int]], steps: int) -> list[tuple[list[int], np.ndarray]]:
        """``steps`` greedy tokens per prompt (EOS does not stop it) and the last-position
        logits of the prefill and of each decode step ([steps, vocab]); prompts of one
        length run as one batch."""
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        out: list = [None] * len(prompts)
        for rows in by_length.values():
            tokens, logits = self._loop(np.asarray([prompts[i] for i in rows], dtype=np.int64), steps)
            for j, i in enumerate(rows):
                out[i] = ([int(t[j]) for t in tokens], np.stack([row[j] for row in logits]))
        return out

    def _loop(self, ids: np.ndarray, steps: int, forced: np.ndarray | None = None, eos=frozenset()) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The greedy loop over a batch ``ids`` [batch, prompt]: per step the argmax tokens
        [batch] and the last-position logits [batch, vocab]. ``forced`` [batch, steps]: fed
        instead of its own choices; ``eos``: it stops once every row has chosen one."""
        past, n = self.empty_past(ids.shape[0]), 0
        tokens, logits = [], []
        ended = np.zeros(ids.shape[0], dtype=bool)
        for i in range(steps):
            step_logits, past = self.step(ids, past, n)
            last = step_logits[:, -1].astype(np.float32)
            logits.append(last)
            tokens.append(last.argmax(-1))
            ended |= np.isin(tokens[-1], list(eos))
            if eos and ended.all():
                break
            n += ids.shape[1]
            ids = (forced[:, i] if forced is not None else tokens[-1])[:, None].astype(np.int64)
        return tokens, logits


GENAI_CONFIG = "genai_config.json"


def genai_model_field(folder: str | Path, key: str):
    """``model.<key>`` of the genai_config.json beside a decoder's model.onnx (``folder`` is the
    folder or the model file); None where there is no readable one."""
    import json

    base = Path(folder)
    base = base if base.is_dir() else base.parent
    try:
        return json.loads((base / GENAI_CONFIG).read_text())["model"][key]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def context_length(folder: str | Path) -> int | None:
    """The decoder's context length from its genai_config.json (None where there is none)."""
    n = genai_model_field(folder, "context_length")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def generation_bytes(decoder: OnnxDecoder, tokens: int) -> int:
    """A lower bound on the memory a greedy run over ``tokens`` positions takes: the KV cache
    at its longest, and one layer's prefill attention (scores, mask and probabilities, one
    row per key/value head)."""
    cache = 0
    heads = 1
    for n in decoder.past_names:
        shape = decoder.inputs[n].shape
        kv, head = (shape[1], shape[3]) if len(shape) == 4 else (1, 1)
        kv, head = (kv if isinstance(kv, int) else 1), (head if isinstance(head, int) else 1)
        heads = max(heads, kv)
        itemsize = np.dtype(NP_DTYPES.get(decoder.inputs[n].type) or np.float32).itemsize
        cache += kv * head * tokens * itemsize
    return cache + 3 * heads * tokens * tokens * 4


def check_length(decoder: OnnxDecoder, folder: str | Path, prompt: int, new_tokens: int) -> None:
    """Refuse (exit 2) a prompt and generation longer than the model's context, or one whose
    cache and attention cannot fit in the memory available."""
    from normexport.hf.config_checks import available_memory

    context = context_length(folder)
    if context is not None and prompt > context:
        raise NormexportError(f"the prompt has {prompt} token ids, more than the model's context of {context}", f"give at most {context} ids")
    if context is not None and prompt + new_tokens > context:
        raise NormexportError(f"{prompt} prompt ids and --max-new-tokens {new_tokens} run past the model's context of {context}",
                              f"give --max-new-tokens {context - prompt} or fewer")
    need, memory = generation_bytes(decoder, prompt + new_tokens), available_memory()
    if memory is not None and need > memory:
        raise NormexportError(f"{prompt + new_tokens} positions need at least {need >> 20} MiB for the cache and attention, {memory >> 20} MiB is available",
                              "give a shorter prompt or fewer new tokens")


def folder_eos_ids(model: str | Path) -> frozenset[int]:
    """The EOS ids in the genai_config.json `normexport convert` writes next to model.onnx
    (none when the file is absent or unreadable)."""
    return eos_set(genai_model_field(model, "eos_token_id"))


def eos_set(value) -> frozenset[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return frozenset(int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0)


def model_eos_ids(module) -> frozenset[int]:
    """EOS ids of a transformers model: its generation config's, else its config's."""
    gen = getattr(module, "generation_config", None)
    found = eos_set(getattr(gen, "eos_token_id", None)) if gen is not None else frozenset()
    if not found:
        cfg = module.config.get_text_config(decoder=True)
        found = eos_set(getattr(cfg, "eos_token_id", None))
    return found


# generation_config.json fields that choose ids or lengths, not logits: nothing for the check to ignore
NOT_PROCESSORS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length", "max_new_tokens",
    "transformers_version", "use_cache", "return_dict_in_generate", "output_scores", "output_logits",
    "output_attentions", "output_hidden_states", "cache_implementation", "_from_model_config", "num_return_sequences",
}


def ignored_processors(module) -> list[str]:
    """Settings of the model's generation_config.json that ``generate()`` would apply to the
    logits (penalties, DoLa, min length, bad words, sampling, ...), as ``name=value``. The
    check does not apply them: the exported graph has none of them."""
    gen = getattr(module, "generation_config", None)
    if gen is None:
        return []
    try:
        diff = gen.to_diff_dict()
    except Exception:  # a generation config transformers itself cannot serialise: list what it holds
        diff = {k: v for k, v in vars(gen).items() if not k.startswith("_")}
    out = []
    for key, value in sorted(diff.items()):
        if key in NOT_PROCESSORS or key.startswith("_") or value is None:
            continue
        if key == "do_sample" and not value:
            continue
        out.append(f"{key}={value!r}"[:120])
    return out


def torch_greedy(module, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """transformers' model, greedy: ``steps`` argmax tokens of the raw logits (EOS does not stop
    it) and the last-position logits of the prefill and of each decode step, with its own
    DynamicCache."""
    import torch
    from transformers import DynamicCache

    from normexport.hf.kv_export import cache_kwarg, output_cache

    key = cache_kwarg(module)
    cache = DynamicCache()
    ids = torch.tensor([prompt])
    n, tokens, logits = 0, [], []
    with torch.inference_mode():
        for _ in range(steps):
            pos = torch.arange(n, n + ids.shape[1]).unsqueeze(0)
            res = module(input_ids=ids, attention_mask=torch.ones(1, n + ids.shape[1], dtype=torch.int64), position_ids=pos, use_cache=True, **{key: cache})
            last = res.logits[0, -1].float()
            logits.append(last.numpy())
            tokens.append(int(last.argmax()))
            cache = output_cache(res)
            n += ids.shape[1]
            ids = torch.tensor([[tokens[-1]]])
    return tokens, logits


def until_eos(tokens: list[int], eos) -> list[int]:
    """``tokens`` up to and including the first EOS."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return list(tokens)


def torch_generate(module, prompt: list[int], max_new_tokens: int, eos=frozenset()) -> list[int]:
    """The check's reference decoding: greedy argmax of transformers' raw logits, stopping
    after a token in ``eos`` (none given: exactly ``max_new_tokens`` tokens)."""
    return until_eos(torch_greedy(module, prompt, max_new_tokens)[0], eos)


def torch_forced_logits(module, prompts: list[list[int]], tokens: list[list[int]]) -> list[np.ndarray]:
    """transformers' logits ([len(tokens), vocab] per prompt) at the last prompt position and at
    each of ``tokens`` but the last: one forward without a cache over prompt + tokens, teacher-
    forced on ``tokens``; prompts of one total length run as one batch."""
    import inspect

    import torch

    keep = "logits_to_keep" in inspect.signature(module.forward).parameters
    by_length: dict[tuple[int, int], list[int]] = {}
    for i, (p, t) in enumerate(zip(prompts, tokens)):
        by_length.setdefault((len(p), len(t)), []).append(i)
    out: list = [None] * len(prompts)
    with torch.inference_mode():
        for (_, steps), rows in by_length.items():
            ids = torch.tensor([prompts[i] + tokens[i][:-1] for i in rows])
            total = ids.shape[1]
            extra = {"logits_to_keep": steps} if keep else {}
            res = module(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(total).expand(len(rows), total), use_cache=False, **extra)
            logits = res.logits[:, -steps:].float().numpy()
            for j, i in enumerate(rows):
                out[i] = logits[j]
    return out


def random_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    """Real token ids drawn across the whole vocabulary."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=length).tolist() for _ in range(count)]


@dataclass
class StepComparison:
    """Logits of one step (0 = prefill), ONNX against PyTorch on the same tokens."""

    step: int
    max_abs: float
    max_rel: float
    cosine: float
    passed: bool = True
    problem: str = ""  # NaN/Inf (side, index) or how far past the tolerance

    def to_json(self) -> dict:
        return {"step": self.step, "max_abs": json_float(self.max_abs), "max_rel": json_float(self.max_rel), "cosine": json_float(self.cosine), "passed": self.passed, "problem": self.problem}


def json_float(v):
    """A float JSON can hold: NaN and +/-Inf become the strings "nan", "inf", "-inf"."""
    from normexport.jsonvalues import strict

    return strict(v)


@dataclass
class PromptResult:
    prompt: list[int]
    torch_tokens: list[int]  # PyTorch's greedy answer up to and including EOS (up to the first difference, where there is one)
    onnx_tokens: list[int]
    steps: list[StepComparison]
    first_difference: int | None = None  # step index where the greedy tokens first differ
    margin: float | None = None  # PyTorch's top-2 logit margin at that step
    tolerated: bool = False  # a flip on a margin below the tolerance

    @property
    def tokens_ok(self) -> bool:
        return self.first_difference is None or self.tolerated

    @property
    def failed_step(self) -> StepComparison | None:
        return next((s for s in self.steps if not s.passed), None)

    @property
    def passed(self) -> bool:
        return self.tokens_ok and self.failed_step is None


@dataclass
class GenerationReport:
    dtype: str
    new_tokens: int
    tolerance: float  # top-2 margin under which a fp16/bf16 flip is a near-tie
    atol: float = 0.0  # per-step logits: |onnx - torch| <= atol + rtol·|torch|
    rtol: float = 0.0
    eos_token_ids: list[int] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # generation_config.json settings not applied
    prompts: list[PromptResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.prompts) and all(p.passed for p in self.prompts)

    def failures(self) -> list[str]:
        """One line per failing prompt: the first failing step's logits, or the token flip."""
        out = []
        for i, p in enumerate(self.prompts):
            s = p.failed_step
            if s is not None:
                out.append(f"prompt {i}, step {s.step}{' (prefill)' if s.step == 0 else ''}: logits {s.problem}")
            if not p.tokens_ok:
                out.append(f"prompt {i}: greedy tokens differ at step {p.first_difference} (PyTorch {p.torch_tokens[p.first_difference] if p.first_difference < len(p.torch_tokens) else 'stopped'}, ONNX {p.onnx_tokens[p.first_difference] if p.first_difference < len(p.onnx_tokens) else 'stopped'}; top-2 margin {p.margin:.4g})")
        return out

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "dtype": self.dtype,
            "new_tokens": self.new_tokens,
            "decoding": "greedy argmax of the raw logits on both sides, stopping after EOS",
            "eos_token_ids": self.eos_token_ids,
            "logits_atol": self.atol,
            "logits_rtol": self.rtol,
            "margin_tolerance": self.tolerance,
            "ignored_generation_config": self.ignored,
            "failures": self.failures(),
            "prompts": [
                {
                    "prompt": p.prompt, "torch_tokens": p.torch_tokens, "onnx_tokens": p.onnx_tokens,
                    "ends_with_eos": bool(p.torch_tokens) and p.torch_tokens[-1] in set(self.eos_token_ids),
                    "tokens_equal": p.first_difference is None, "first_difference": p.first_difference,
                    "top2_margin_at_difference": json_float(p.margin), "tolerated": p.tolerated,
                    "logits_passed": p.failed_step is None,
                    "steps": [s.to_json() for s in p.steps],
                }
                for p in self.prompts
            ],
            "notes": self.notes,
        }


def flip_tolerated(dtype: str, margin: float, tolerance: float, logit_error: float) -> bool:
    """A greedy token may flip in fp16/bf16 only where PyTorch's top-2 margin is within the
    logits' tolerance or within twice the measured logit error at that step; fp32 never."""
    return dtype != "float32" and margin <= max(tolerance, 2 * logit_error)


def compare_step(step: int, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> StepComparison:
    from normexport.validate import compare_arrays

    c = compare_arrays("logits", ref.astype(np.float32), got.astype(np.float32), atol, rtol)
    problem = c.problem
    if not c.passed and not problem:
        problem = f"max abs {c.max_abs:.3g}, max rel {c.max_rel:.3g} at index {c.worst_index} exceed atol {atol:g} + rtol {rtol:g}·|PyTorch| (needs atol >= {c.min_atol:.3g} or rtol >= {c.min_rtol:.3g})"
    return StepComparison(step, c.max_abs, c.max_rel, c.cosine, c.passed, problem)


def logits_tolerances(dtype: str, atol=None, rtol=None) -> tuple[float, float]:
    """The per-step logits tolerances: ``--atol/--rtol`` (one value, or ``logits=VALUE``), else
    normexport.validate's defaults for the model's dtype."""
    from normexport.validate import DEFAULT_TOLERANCES, tolerance_for

    d_atol, d_rtol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float32"])
    return tolerance_for(atol, "logits", d_atol), tolerance_for(rtol, "logits", d_rtol)


CHECK_PROMPT_LEN = 7  # token ids per seeded prompt of the check


def require_check_window(context: int | None, new_tokens: int, hint: str | None = None, prompt_len: int = CHECK_PROMPT_LEN) -> None:
    """Refuse (exit 2) a check whose prompts and ``new_tokens`` run past the model's context
    (``context``: its max_position_embeddings or genai_config's context_length; None: unknown).
    ``hint``: the way out (default: a smaller ``--gen-tokens``)."""
    if isinstance(context, int) and not isinstance(context, bool) and prompt_len + new_tokens > context:
        raise NormexportError(f"the check's {prompt_len}-token prompts and {new_tokens} generated tokens run past the model's context of {context} positions",
                              hint or f"give --gen-tokens {max(1, context - prompt_len)} or fewer")


@dataclass
class OnnxRuns:
    """The ONNX side of the check: per prompt, ``steps`` greedy tokens (past EOS) and the
    logits of the prefill and of every decode step."""

    prompts: list[list[int]]
    runs: list[tuple[list[int], np.ndarray]]

    def against(self, module):
        """(prompt, ONNX tokens, ONNX logits, transformers' logits teacher-forced on those
        tokens) per prompt: transformers reads each prompt and its tokens in one forward."""
        from normexport.hf.folder import quiet_transformers

        with quiet_transformers():
            references = torch_forced_logits(module, self.prompts, [tokens for tokens, _ in self.runs])
        for prompt, (tokens, logits), ref in zip(self.prompts, self.runs, references):
            yield prompt, tokens, logits, ref


def onnx_generation(decoder: OnnxDecoder, vocab_size: int, new_tokens: int, seed: int, prompts: int = 2, prompt_len: int = CHECK_PROMPT_LEN, prompt_ids: list[list[int]] | None = None) -> OnnxRuns:
    """The ONNX decoder's greedy runs on the check's prompts: after it the session is no longer
    needed (a caller may free it before transformers reads the weights)."""
    if new_tokens < 1:
        raise NormexportError(f"the check generates {new_tokens} tokens: nothing would be compared", "give --gen-tokens 1 or more")
    chosen = [list(p) for p in prompt_ids] if prompt_ids else random_prompts(vocab_size, prompts, prompt_len, seed)
    return OnnxRuns(chosen, decoder.greedy_batch(chosen, new_tokens))


def check_generation(module, decoder: OnnxDecoder, dtype: str, new_tokens: int, seed: int, prompts: int = 2, prompt_len: int = CHECK_PROMPT_LEN, atol=None, rtol=None, prompt_ids: list[list[int]] | None = None) -> GenerationReport:
    """Per-step logits (enforced) and greedy tokens up to EOS, ONNX vs transformers.
    ``prompt_ids``: these prompts instead of random ones."""
    vocab = module.config.get_text_config(decoder=True).vocab_size
    runs = onnx_generation(decoder, vocab, new_tokens, seed, prompts, prompt_len, prompt_ids)
    return compare_generation(module, runs, dtype, new_tokens, atol, rtol)


def greedy_answers(reference: np.ndarray, tokens: list[int], eos) -> tuple[list[int], list[int], int | None]:
    """From ONNX's ``tokens`` and transformers' logits teacher-forced on them ([steps, vocab]):
    transformers' greedy answer (up to and including EOS, or up to the first step where its
    argmax is not ONNX's token), ONNX's answer up to and including EOS, and that first step
    (None: the answers are equal)."""
    onnx_tokens = until_eos(tokens, eos)
    diff = next((i for i, t in enumerate(onnx_tokens) if int(np.argmax(reference[i])) != t), None)
    torch_tokens = onnx_tokens if diff is None else onnx_tokens[:diff] + [int(np.argmax(reference[diff]))]
    return torch_tokens, onnx_tokens, diff


def compare_generation(module, onnx: OnnxRuns, dtype: str, new_tokens: int, atol=None, rtol=None) -> GenerationReport:
    """transformers' model, teacher-forced on the ONNX tokens, against the ONNX runs: every
    step's logits within the tolerances, and its argmax equal to the ONNX token up to EOS."""
    from normexport.validate import DEFAULT_TOLERANCES

    margin_tol = DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))[0] * 10 if dtype != "float32" else 0.0
    eos = model_eos_ids(module)
    atol, rtol = logits_tolerances(dtype, atol, rtol)
    report = GenerationReport(dtype, new_tokens, margin_tol, atol, rtol, sorted(eos), ignored_processors(module))
    for prompt, tokens, onnx_logits, ref_logits in onnx.against(module):
        torch_tokens, onnx_tokens, diff = greedy_answers(ref_logits, tokens, eos)
        steps = [compare_step(i, r, g, atol, rtol) for i, (r, g) in enumerate(zip(ref_logits, onnx_logits))]
        result = PromptResult(prompt, torch_tokens, onnx_tokens, steps)
        if diff is not None:
            top2 = np.sort(ref_logits[diff])[-2:]
            result.first_difference, result.margin = diff, float(top2[1] - top2[0])
            result.tolerated = flip_tolerated(dtype, result.margin, margin_tol, steps[diff].max_abs)
        report.prompts.append(result)
    report.notes.append("transformers read each prompt and the ONNX tokens in one forward without a cache; its argmax at every step up to EOS is compared with the ONNX token"
                        + ("; where they differ, its tokens after that step are not computed" if any(p.first_difference is not None for p in report.prompts) else ""))
    if report.ignored:
        report.notes.append(f"generation_config.json settings not applied by the check (no exported graph holds them; both sides decode greedily): {', '.join(report.ignored)}")
    if not eos:
        report.notes.append("the model names no eos_token_id: both sides generate the full window")
    if dtype == "float32":
        report.notes.append("float32: greedy tokens must equal transformers' token for token")
    return report
