"""A model the tests own, unlike the shipped one: a tiny Mistral-like decoder on
torch.nn.RMSNorm (aten::rms_norm), with 2 inputs, for the four input forms of convert."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(d, eps=1e-5)
        self.attn = nn.Linear(d, d)
        self.norm2 = nn.RMSNorm(d, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OwnModel(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 48, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])
        self.norm = nn.RMSNorm(d, eps=1e-5)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + bias
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


NUM_NORMS = 5


def build(seed: int = 0) -> OwnModel:
    torch.manual_seed(seed)
    m = OwnModel()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return m.eval()


def example_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, 100, (2, 12), generator=g), "bias": torch.randn(2, 12, 48, generator=g)}


def factory():
    return build(), example_inputs()


def module_only():
    return build()


class NoNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


def no_norm_factory():
    return NoNorm().eval(), {"x": torch.randn(2, 8)}
