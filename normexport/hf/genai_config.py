"""genai_config.json in onnxruntime-genai's format (the fields its model builder writes), for
the decoder normexport exports. The generic attention graph takes position_ids and its past and
present are separate buffers that grow by concatenation (``past_present_share_buffer`` false);
a GroupQueryAttention graph takes no position_ids and appends in place into one buffer of the
context length (``past_present_share_buffer`` true), as the builder's GroupQueryAttention
models do."""

from __future__ import annotations

from normexport.hf.folder import HFModel
from normexport.hf.kv_export import kv_layout

# The text-only types onnxruntime-genai runs as its generic decoder-only model (its
# src/models/model_type.h, ModelType::IsLLM, as of 0.18), less the ones it drives differently
# (gpt2: its own model class; lfm2: a convolution-state cache; phi3/phimoe/phi3small: a rotary
# rewind past 4k tokens that its builder's graphs expect). A model_type genai does not know
# runs as "decoder": the same DecoderOnly model, inputs input_ids, attention_mask,
# position_ids, past_key_values.%d.key/value, outputs logits, present.%d.key/value.
GENAI_DECODER_TYPES = frozenset({
    "chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gemma4_text", "gptoss", "granite",
    "granitemoehybrid", "hunyuandensev1", "internlm2", "llama", "mistral", "nemotron", "olmo", "qwen2", "qwen3",
    "qwen3_5_moe_text", "qwen3_5_text", "smollm3",
})
GENERIC_TYPE = "decoder"


def genai_type(model_type: str) -> str:
    """onnxruntime-genai's model type for a transformers ``model_type``: itself where genai runs
    it as the generic decoder, else ``"decoder"`` (phi3 keeps its type: its transformers
    model is the one genai's phi3 expects)."""
    if model_type in GENAI_DECODER_TYPES or model_type == "phi3":
        return model_type
    return GENERIC_TYPE


def _token_id(value, default):
    if isinstance(value, list):
        return value if value else default
    return default if value is None else value


def past_shapes(model) -> dict[str, tuple]:
    """(heads, head_dim) of each past input of a decoder graph (an onnx_ir Model)."""
    return {v.name: tuple(v.shape)[1::2] for v in model.graph.inputs if v.name.startswith("past_key_values.") and v.shape is not None}


def genai_cache_refusal(shapes: dict[str, tuple]) -> str | None:
    """Why onnxruntime-genai cannot run a decoder whose past inputs have these (heads, head_dim),
    or None: it allocates one [kv heads, head size] for every key and value."""
    kinds = sorted(set(shapes.values()), key=str)
    if len(kinds) <= 1:
        return None
    keys = sorted({v for k, v in shapes.items() if k.endswith(".key")}, key=str)
    values = sorted({v for k, v in shapes.items() if k.endswith(".value")}, key=str)
    return (f"onnxruntime-genai gives every key and value one [kv heads, head size], and this model caches keys as {', '.join(map(str, keys))} "
            f"and values as {', '.join(map(str, values))} ([heads, dim]; multi-head latent attention caches its compressed latent)")


def genai_config(hf: HFModel, gqa: bool = False, past: tuple | None = None) -> dict:
    """``past``: (kv heads, head_dim) of the written graph's past inputs where known (the
    config's otherwise)."""
    cfg = hf.text_config
    layout = kv_layout(cfg)
    if past is not None and all(isinstance(v, int) for v in past):
        layout.kv_heads, layout.head_dim = past
    context = getattr(cfg, "max_position_embeddings", None) or 2048
    eos = _token_id(getattr(cfg, "eos_token_id", None), 0)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"}
    if gqa:
        del inputs["position_ids"]
    return {
        "model": {
            "bos_token_id": _token_id(getattr(cfg, "bos_token_id", None), 0),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": layout.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    **inputs,
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": layout.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": _token_id(getattr(cfg, "pad_token_id", None), eos if isinstance(eos, int) else eos[0]),
            "type": genai_type(cfg.model_type),
            "vocab_size": layout.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": gqa,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
