"""The shipped example: a small LLaMA-style decoder whose RMSNorm is written the way tutorials
write it (a ``gamma`` parameter, computed on ``x.float()``, cast back with ``type_as``).

    python models/tinyllama.py            # regenerates models/tinyllama.pt, deterministically

The .pt is a torch.export archive (torch.export.save; normexport tells kinds apart by content)
carrying its example inputs, with the sequence dim dynamic, so `normexport convert
models/tinyllama.pt` needs no other option and goes through torch's default (dynamo) exporter,
whose RMSNorm chain onnxruntime's own optimizer does not fuse.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn

CONFIG = dict(vocab=512, hidden=128, layers=4, heads=4, mlp=344, eps=1e-6, rope_theta=10000.0)
EXAMPLE_SHAPE = (2, 32)  # batch 2: torch.export specialises a dim of size 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.gamma


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding on [B, H, T, D] (halves rotated, as in LLaMA's HF port)."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, theta: float):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.theta = theta
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, self.theta), rope(k, self.theta)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        out = scores.softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.input_norm = RMSNorm(cfg["hidden"], cfg["eps"])
        self.attn = Attention(cfg["hidden"], cfg["heads"], cfg["rope_theta"])
        self.post_attn_norm = RMSNorm(cfg["hidden"], cfg["eps"])
        self.mlp = MLP(cfg["hidden"], cfg["mlp"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_attn_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg: dict | None = None):
        super().__init__()
        cfg = dict(CONFIG, **(cfg or {}))
        self.embed = nn.Embedding(cfg["vocab"], cfg["hidden"])
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg["layers"])])
        self.norm = RMSNorm(cfg["hidden"], cfg["eps"])
        self.lm_head = nn.Linear(cfg["hidden"], cfg["vocab"], bias=False)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits by name, as transformers' causal LMs return them: the ONNX output is named so."""
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return {"logits": self.lm_head(self.norm(x))}


def build(seed: int = 0) -> TinyLlama:
    """Deterministic weights; norm gains drawn around 1 so a dropped gain shows in outputs."""
    g = torch.Generator().manual_seed(seed)
    model = TinyLlama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.1))
    return model.eval()


def example_inputs(shape=EXAMPLE_SHAPE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, CONFIG["vocab"], shape, generator=g, dtype=torch.int64)}


def factory():
    """For `--factory models.tinyllama:factory` (a state_dict of this model)."""
    return build(), example_inputs()


def main(out: str = str(Path(__file__).with_name("tinyllama.pt"))) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from normexport.load import save_exported

    save_exported(build(), example_inputs(), Path(out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
