"""A model the tests own with two token inputs of different vocabularies (an encoder's and a
decoder's embedding), an optional mask and RMSNorms: feeding one input's ids to the other's
embedding changes the numbers, so binding by position instead of by name shows."""

from __future__ import annotations

import torch
from torch import nn

ENC_VOCAB, DEC_VOCAB, D = 50, 30, 32


class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(64, D)  # the first embedding, fed by neither input
        self.enc = nn.Embedding(ENC_VOCAB, D)
        self.dec = nn.Embedding(DEC_VOCAB, D)
        self.norm_enc = nn.RMSNorm(D, eps=1e-5)
        self.norm_dec = nn.RMSNorm(D, eps=1e-5)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, DEC_VOCAB)

    def forward(self, input_ids, decoder_input_ids, attention_mask=None):
        pos = self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        enc = self.norm_enc(self.enc(input_ids) + pos)
        if attention_mask is not None:
            enc = enc * attention_mask.unsqueeze(-1).to(enc.dtype)
        ctx = enc.mean(dim=1, keepdim=True)
        dec = self.norm_dec(self.dec(decoder_input_ids) + self.mix(ctx))
        return self.head(dec)


def build(seed: int = 0) -> TwoInput:
    torch.manual_seed(seed)
    m = TwoInput()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m.eval()


def module_only():
    return build()


def with_example():
    """Example ids over [0, 20) only: a run that keeps the example's range stays below 20."""
    g = torch.Generator().manual_seed(1)
    return build(), {
        "decoder_input_ids": torch.randint(0, 20, (2, 6), generator=g),
        "input_ids": torch.randint(0, 20, (2, 8), generator=g),
        "attention_mask": torch.ones(2, 8, dtype=torch.int64),
    }


class Unexportable(nn.Module):
    """Branches on a tensor's value: eager runs, torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(8)

    def forward(self, x):
        if x.sum() > 0:
            return self.norm(x)
        return -self.norm(x)


def unexportable():
    return Unexportable().eval(), {"x": torch.randn(2, 8)}


def empty_example():
    """An example with a zero-length sequence: nothing a comparison could check."""
    return build(), {"input_ids": torch.zeros(2, 0, dtype=torch.int64), "decoder_input_ids": torch.zeros(2, 0, dtype=torch.int64)}
