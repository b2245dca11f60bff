"""Train the tiny Llama shipped in models/tiny-trained-llama/ (CPU, one thread, about a minute).

The text is the Zen of Python (the ``this`` module, in every Python), one aphorism per line, an
end-of-sequence token after each. A byte-level BPE tokenizer is trained on the same text with the
``tokenizers`` library (offline). The model (LlamaForCausalLM, hidden 64, 2 layers, GQA 4/2 heads)
trains until it reproduces every line from its first tokens and ends it with EOS: peaked
distributions and a real EOS, which random configs never show. With ``--tied`` the LM head and
the embedding share one table (``tie_word_embeddings``, as Qwen2-0.5B, Llama 3.2 1B and Gemma
do).

    python models/train_tiny_llama.py [--tied] [OUTDIR]
    # default OUTDIR: models/tiny-trained-llama (models/tiny-trained-llama-tied with --tied)

Deterministic: seed 0, one thread; the result is saved with save_pretrained (safetensors,
config.json, generation_config.json with eos_token_id, tokenizer files).
"""

from __future__ import annotations

import codecs
import sys
from pathlib import Path

import torch

SEED = 0
VOCAB = 384
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
PAD, BOS, EOS = 0, 1, 2
STEPS = 1500
DEFAULT_OUT = Path(__file__).resolve().parent / "tiny-trained-llama"
TIED_OUT = Path(__file__).resolve().parent / "tiny-trained-llama-tied"


def zen_lines() -> list[str]:
    """The Zen of Python, as the ``this`` module stores it (rot13), without importing it (the
    import prints it)."""
    import importlib.util

    spec = importlib.util.find_spec("this")
    source = Path(spec.origin).read_text()
    encoded = source.split('s = """', 1)[1].split('"""', 1)[0]
    text = codecs.decode(encoded, "rot13")
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_tokenizer(lines: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(vocab_size: int, tied: bool = False):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
    return model


def batch(tokenizer, lines: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [[BOS, *tokenizer(line, add_special_tokens=False)["input_ids"], EOS] for line in lines]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    return ids, labels


def recites(model, tokenizer, lines: list[str], prefix_tokens: int = 3) -> float:
    """Share of lines the model completes exactly (greedy, EOS included) from BOS + its first tokens."""
    ok = 0
    with torch.inference_mode():
        for line in lines:
            target = [*tokenizer(line, add_special_tokens=False)["input_ids"], EOS]
            prompt = torch.tensor([[BOS, *target[:prefix_tokens]]])
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(target), do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
            ok += out[0, prompt.shape[1]:].tolist() == target[prefix_tokens:]
    return ok / len(lines)


def main(out: Path = DEFAULT_OUT, tied: bool = False) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    lines = zen_lines()
    tokenizer = build_tokenizer(lines)
    model = build_model(len(tokenizer), tied)
    ids, labels = batch(tokenizer, lines)
    mask = (ids != PAD).long()
    mask[:, 0] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=STEPS, pct_start=0.1)
    model.train()
    for step in range(STEPS):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == STEPS - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    share = recites(model, tokenizer, lines)
    print(f"lines recited exactly from 3 tokens: {share:.0%}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "TRAINING.txt").write_text(
        f"Trained by models/train_tiny_llama.py: {len(lines)} lines of the Zen of Python (the `this` module), EOS after each,\n"
        f"byte-level BPE vocabulary {len(tokenizer)}, {'tied word embeddings, ' if tied else ''}{STEPS} AdamW steps, seed {SEED}, one CPU thread; final loss {loss.item():.4f};\n"
        f"lines recited exactly (greedy, EOS included) from BOS + 3 tokens: {share:.0%}.\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    tied = "--tied" in args
    rest = [a for a in args if a != "--tied"]
    main(Path(rest[0]) if rest else TIED_OUT if tied else DEFAULT_OUT, tied)
