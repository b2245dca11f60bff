"""Tiny randomly initialised Hugging Face folders (save_pretrained, safetensors) for the tests.

Each entry: transformers config class, model class and config overrides on a shared decoder
(hidden 64, 2 layers, 4 heads of 16 with 2 KV heads, vocabulary 1000). Norm weights are drawn
away from 1 so that a fusion that dropped the scale would show, and Linear biases (Qwen2's
q/k/v) away from 0 so that a dropped bias would.
"""

from __future__ import annotations

from pathlib import Path

import torch

DECODER = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rms_norm_eps=1e-6)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rms_norm_eps=1e-5, sliding_window=8)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rms_norm_eps=1e-6)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(rms_norm_eps=1e-5, pad_token_id=0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(rms_norm_eps=1e-6)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)),
}

# More families, for the onnxruntime-genai run on every kind of folder normexport writes (genai
# knows some of these model types and runs the others as its generic "decoder"); MoE ones too.
# Mistral and Qwen2 are in FAMILIES (GroupQueryAttention), whose genai run is in test_hf.
MORE_FAMILIES = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, decoder_sparse_step=1)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(rms_norm_eps=1e-8)),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(rms_norm_eps=1e-5)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(rms_norm_eps=1e-5)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(rms_norm_eps=1e-6)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(rms_norm_eps=1e-6)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(rms_norm_eps=1e-6, sliding_window=8)),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(rms_norm_eps=1e-5, sliding_window=8)),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(rms_norm_eps=1e-5)),
}


def save_tiny(family: str, folder: Path, seed: int = 0, attn: str | None = None, max_shard_size: str | None = None) -> Path:
    import transformers

    cfg_name, model_name, overrides = {**FAMILIES, **MORE_FAMILIES}[family]
    config = getattr(transformers, cfg_name)(**{**DECODER, **overrides})
    if attn:
        config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).eval()
        with torch.no_grad():
            for m in model.modules():
                if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None:
                    m.weight.normal_(0.0 if "Gemma" in type(m).__name__ else 1.0, 0.2)
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.normal_(0.0, 0.02)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def hf_generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate()``: argmax, stopping after the model's EOS; the
    model's generation_config.json adds nothing (a neutral config is passed)."""
    import transformers

    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else model.config.eos_token_id
    config = transformers.GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos if isinstance(eos, int) else 0)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


def genai_generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy search on a folder normexport wrote (stops at its EOS)."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens
