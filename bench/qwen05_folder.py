"""A randomly initialised folder with Qwen2-0.5B's shapes (hidden 896, 24 layers, 14 heads with 2
KV heads, intermediate 4864, vocabulary 151936, tied embeddings, fp32) and a word-level
tokenizer, saved with save_pretrained: nothing is downloaded.

    python bench/qwen05_folder.py DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

QWEN2_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643, pad_token_id=151643,
)


def save_qwen05(folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2_05B)).save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(QWEN2_05B["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2").save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(save_qwen05(Path(sys.argv[1])))
