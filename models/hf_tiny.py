"""Tiny, randomly initialised transformers models (built from a Config; nothing is downloaded).

``HF_ZOO`` maps a name to the same ``ZooEntry`` as ``models.zoo``. Each model is wrapped so it
takes ``input_ids`` and returns one tensor (logits; the T5 encoder returns its last hidden
state), with the KV cache off. Without transformers, ``HF_ZOO`` is empty and
``HF_UNAVAILABLE_REASON`` says why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.zoo import ZooEntry, example_inputs, module_factories, randomize_norm_params_

HF_ZOO: dict[str, ZooEntry] = {}
HF_UNAVAILABLE_REASON: str | None = None

try:
    import transformers
except ImportError as exc:  # optional dependency
    transformers = None
    HF_UNAVAILABLE_REASON = f"transformers is not installed ({exc}); pip install transformers"

SEED = 0
LAYERS = 2

# Shared by every decoder config: vocab 128, hidden 64, 4 heads of 16 (2 KV heads: GQA), MLP 128.
_DECODER = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    use_cache=False,
    pad_token_id=0,  # the defaults of some families lie outside a 128-token vocabulary
    bos_token_id=1,
    eos_token_id=2,
)


class OutputOnly(nn.Module):
    """input_ids -> the model's first output (logits), no cache, no ModelOutput.

    It passes what a generation loop would pass, built from the input's shape, to keep two
    exporter problems out of the way:
    - attention_mask of ones: without one, transformers' masking_utils looks for packed
      sequences with torch.diff, which the TorchScript exporter cannot export
      ("Exporting the operator 'aten::diff' to ONNX opset version 17 is not supported").
    - position_ids expanded to [B, T]: from the default [1, T] ids the dynamo exporter's
      opset-23 optimizer fuses the rotary embedding into ONNX RotaryEmbedding with cos/sin
      caches of batch 1, which onnxruntime rejects for any batch but 1 when the batch is dynamic
      ("Inputs 'cos_cache' and 'sin_cache' are expected to have the same shape as input 'x'").
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            position_ids=positions.unsqueeze(0).expand_as(input_ids),
            use_cache=False,
            return_dict=False,
        )[0]


class EncoderOutputOnly(OutputOnly):
    """T5EncoderModel: no cache, no position ids (relative position buckets)."""

    def forward(self, input_ids):
        return self.model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), return_dict=False
        )[0]


def _builder(config_cls: str, model_cls: str, config_kwargs: dict, wrapper=OutputOnly) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_cls)(**config_kwargs)
        config._attn_implementation = "eager"  # plain MatMul/Softmax attention; export-friendly
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = getattr(transformers, model_cls)(config)
            randomize_norm_params_(model)
        return wrapper(model).eval()

    return build


def _decoder(**overrides) -> dict:
    return {**_DECODER, **overrides}


# name: (config class, model class, config kwargs, norm calls per forward, description[, wrapper])
_SPECS = {
    "hf_llama": (
        "LlamaConfig", "LlamaForCausalLM", _decoder(rms_norm_eps=1e-5), 2 * LAYERS + 1,
        "transformers LlamaForCausalLM: LlamaRMSNorm, GQA",
    ),
    "hf_mistral": (
        "MistralConfig", "MistralForCausalLM", _decoder(rms_norm_eps=1e-5, sliding_window=None),
        2 * LAYERS + 1, "transformers MistralForCausalLM: MistralRMSNorm (Llama spelling)",
    ),
    "hf_qwen2": (
        "Qwen2Config", "Qwen2ForCausalLM", _decoder(rms_norm_eps=1e-6), 2 * LAYERS + 1,
        "transformers Qwen2ForCausalLM: Qwen2RMSNorm (Llama spelling), q/k/v biases",
    ),
    "hf_qwen3": (
        "Qwen3Config", "Qwen3ForCausalLM", _decoder(rms_norm_eps=1e-6), 4 * LAYERS + 1,
        "transformers Qwen3ForCausalLM: Llama spelling plus per-head q/k norm on [B, T, H, 16]",
    ),
    "hf_gemma": (
        "GemmaConfig", "GemmaForCausalLM", _decoder(rms_norm_eps=1e-6, tie_word_embeddings=True),
        2 * LAYERS + 1, "transformers GemmaForCausalLM: GemmaRMSNorm (1 + weight, fp32)",
    ),
    "hf_gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        _decoder(rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=16),
        4 * LAYERS + 1,
        "transformers Gemma2ForCausalLM: 4 Gemma norms per layer, soft-capping, sliding window 8",
    ),
    "hf_gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        _decoder(rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=16),
        6 * LAYERS + 1,
        "transformers Gemma3ForCausalLM: 4 Gemma norms per layer plus per-head q/k norm",
    ),
    "hf_olmo2": (
        "Olmo2Config", "Olmo2ForCausalLM", _decoder(rms_norm_eps=1e-6), 4 * LAYERS + 1,
        "transformers Olmo2ForCausalLM: (weight * h).to(dtype), post-norm, q/k norm over the "
        "projection width (64 for q, 32 for k)",
    ),
    "hf_t5_encoder": (
        "T5Config", "T5EncoderModel",
        dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=LAYERS, num_heads=4,
             feed_forward_proj="relu", layer_norm_epsilon=1e-6, use_cache=False),
        2 * LAYERS + 1,
        "transformers T5EncoderModel: T5LayerNorm; returns the last hidden state [B, T, 64]",
        EncoderOutputOnly,
    ),
}


def _available(attr: str) -> bool:
    try:  # transformers imports a family's module lazily, here; it may fail on its own imports
        return hasattr(transformers, attr)
    except Exception:
        return False


if transformers is not None:
    for _name, (_cfg, _cls, _kwargs, _norms, _desc, *_wrap) in _SPECS.items():
        if not (_available(_cfg) and _available(_cls)):
            continue  # older transformers: the family does not exist yet
        HF_ZOO[_name] = ZooEntry(
            name=_name,
            build=_builder(_cfg, _cls, _kwargs, *_wrap),
            example_inputs=example_inputs,
            num_norms=_norms,
            description=_desc,
            eps=_kwargs.get("rms_norm_eps", _kwargs.get("layer_norm_epsilon")),
        )


def factory(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(model, example inputs) for an HF_ZOO entry."""
    if name not in HF_ZOO:
        reason = HF_UNAVAILABLE_REASON or f"have {', '.join(HF_ZOO)}"
        raise KeyError(f"no tiny transformers model {name!r}: {reason}")
    entry = HF_ZOO[name]
    return entry.build(), entry.example_inputs()


# Factories for `--factory models.hf_tiny:<name>` (only the families this transformers has).
globals().update(module_factories(factory, HF_ZOO))
