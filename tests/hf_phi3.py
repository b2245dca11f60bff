"""A tiny randomly initialised transformers Phi3ForCausalLM, used as is (no wrapper): its
forward takes input_ids, attention_mask, ... all optional, and returns a ModelOutput."""

from __future__ import annotations

import torch

VOCAB = 128


def build():
    import transformers

    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Phi3ForCausalLM(config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(0.3 * torch.randn_like(p))
    return model.eval()
