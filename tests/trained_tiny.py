"""A trained tiny Llama for the tests whose thresholds only mean something on a trained model
(a random model's logits are flat: top-1 flips on noise).

``trained_llama(tmp)``: the checkpoint shipped in models/tiny-trained-llama when the repository
has it, else one trained here: LlamaForCausalLM (hidden 64, 2 layers, 4/2 heads) on the Zen of
Python (the ``this`` module) at byte level (ids = byte + 3; 0 pad, 1 BOS, 2 EOS), AdamW on one
thread, deterministic (seed 0), about half a minute.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import torch

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "tiny-trained-llama"
PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
STEPS = 400


def zen_lines() -> list[str]:
    import importlib.util

    source = Path(importlib.util.find_spec("this").origin).read_text()
    text = codecs.decode(source.split('s = """', 1)[1].split('"""', 1)[0], "rot13")
    return [line.strip() for line in text.splitlines() if line.strip()]


def train(folder: Path, steps: int = STEPS) -> Path:
    import transformers

    lines = zen_lines()
    seqs = [[BOS, *(b + OFFSET for b in line.encode()), EOS] for line in lines]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    labels = torch.full((len(seqs), width), -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], labels[i, : len(s)] = torch.tensor(s), torch.tensor(s)
    config = transformers.LlamaConfig(
        vocab_size=256 + OFFSET, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(config)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
            model.train()
            for _ in range(steps):
                loss = model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(folder, safe_serialization=True)
    (folder / "TRAINING.txt").write_text(f"tests/trained_tiny.py: {steps} steps on the Zen of Python, bytes; final loss {loss.item():.4f}\n")
    return folder


def trained_llama(tmp: Path) -> Path:
    if (SHIPPED / "config.json").is_file():
        return SHIPPED
    return train(tmp / "trained-llama")


class LogitsOnly(torch.nn.Module):
    """input_ids -> logits of a transformers causal LM, no cache: a model file for `convert MODEL.pt`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        mask = torch.ones_like(input_ids)
        positions = torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits


def trained_model_file(folder: Path, path: Path) -> Path:
    """The trained folder's model as a pickled whole module (load it with --trust-pickle)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()
    torch.save(LogitsOnly(model).eval(), path)
    return path
