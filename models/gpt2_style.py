"""Small GPT-2-style decoders for ``normexport ln2rms`` and its tests.

Factories (``--factory models.gpt2_style:<name>``), each returning
``(module_in_eval_mode, {"input_ids": int64 [1, 16]})``:

* ``gpt2_small``          Pre-LN decoder: vocab 256, d=64, 2 layers, 4 heads, learned
                          positions, GELU MLP, final LayerNorm, tied LM head. Every
                          LayerNorm has a non-trivial random gain and bias, embedding rows
                          have non-zero means: the conversion has real work to do.
* ``gpt2_small_4l``       the same with 4 layers.
* ``gpt2_post_ln``        Post-LN variant (``x = LN(x + f(x))``): must be refused.
* ``gpt2_mlp_no_out_proj``  Pre-LN, but the MLP branch ends in a GELU after its
                          down-projection, not in a linear layer: must be refused.
* ``gpt2_hf_tiny``        (needs ``transformers``) a randomly initialised HF
                          ``GPT2LMHeadModel`` (n_embd 64, n_layer 2, n_head 4; no
                          download) wrapped to take ``input_ids`` and return logits.
                          Its attention and MLP use HF's ``Conv1D`` (weight [in, out]).

``build_gpt2(...)`` exposes the knobs (width, heads, layers, vocab, positions, variants)
for the benchmark and for tests that need an odd variant.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "GPT2Style",
    "build_gpt2",
    "gpt2_small",
    "gpt2_small_4l",
    "gpt2_post_ln",
    "gpt2_mlp_no_out_proj",
    "gpt2_hf_tiny",
    "example_inputs",
]


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        if d % n_head:
            raise ValueError(f"d={d} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)  # the branch's output projection
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        hd = d // self.n_head
        q = q.view(b, t, self.n_head, hd).transpose(1, 2)
        k = k.view(b, t, self.n_head, hd).transpose(1, 2)
        v = v.view(b, t, self.n_head, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf"))
        att = self.attn_dropout(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, d: int, dropout: float, end_in_linear: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(dropout)
        self.end_in_linear = end_in_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(self.act(self.c_fc(x)))
        if not self.end_in_linear:
            y = F.gelu(y)  # the branch now ends in a non-linearity, not a projection
        return self.dropout(y)


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float, post_ln: bool, mlp_end_in_linear: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = CausalSelfAttention(d, n_head, dropout)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = MLP(d, dropout, end_in_linear=mlp_end_in_linear)
        self.post_ln = post_ln

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:  # original Transformer: normalise after the residual add
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Style(nn.Module):
    """GPT-2-style decoder: ``forward(input_ids [B, T] int64) -> logits [B, T, vocab]``."""

    def __init__(
        self,
        vocab: int = 256,
        d: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_positions: int = 128,
        dropout: float = 0.1,
        post_ln: bool = False,
        mlp_end_in_linear: bool = True,
        tie_head: bool = True,
    ):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(n_positions, d)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(
            Block(d, n_head, dropout, post_ln, mlp_end_in_linear) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie_head:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights that make the Pre-LN -> Pre-RMSNorm conversion non-trivial.

    Embedding rows get a per-row offset (non-zero row means), every LayerNorm a gain
    around 1 and a non-zero bias, every linear layer a non-zero bias.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    for m in model.modules():
        if isinstance(m, nn.Embedding):
            n, d = m.weight.shape
            m.weight.copy_(0.5 * rnd(n, d) + rnd(n, 1))
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.copy_(1.0 + 0.3 * rnd(*m.weight.shape))
            if m.bias is not None:
                m.bias.copy_(0.2 * rnd(*m.bias.shape))
        elif isinstance(m, nn.Linear):
            fan_in = m.weight.shape[1]
            m.weight.copy_(rnd(*m.weight.shape) / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(0.1 * rnd(*m.bias.shape))
    return model


def example_inputs(vocab: int = 256, batch: int = 1, seq: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int64)}


def build_gpt2(seed: int = 0, **kwargs) -> tuple[nn.Module, dict]:
    """Build, randomise (seeded) and ``eval()`` a :class:`GPT2Style`; returns (model, inputs)."""
    torch.manual_seed(seed)
    model = GPT2Style(**kwargs)
    randomize_(model, seed)
    model.eval()
    return model, example_inputs(kwargs.get("vocab", 256))


def gpt2_small():
    """Pre-LN GPT-2-style decoder: vocab 256, d=64, 2 layers, 4 heads, tied head."""
    return build_gpt2(n_layer=2)


def gpt2_small_4l():
    """The same with 4 layers."""
    return build_gpt2(n_layer=4)


def gpt2_post_ln():
    """Post-LN variant (norm after the residual add): ln2rms must refuse it."""
    return build_gpt2(n_layer=2, post_ln=True)


def gpt2_mlp_no_out_proj():
    """Pre-LN, but the MLP branch ends in a GELU, not a linear layer: must be refused."""
    return build_gpt2(n_layer=2, mlp_end_in_linear=False)


class HFLogits(nn.Module):
    """Wrap an HF causal LM so that ``forward(input_ids) -> logits``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False, return_dict=True).logits


def gpt2_hf_tiny(seed: int = 0):
    """Randomly initialised tiny HF ``GPT2LMHeadModel`` (n_embd 64, 2 layers, 4 heads).

    No download: the config is built locally. Raises ImportError without transformers.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    )
    lm = GPT2LMHeadModel(cfg)
    # HF initialises LayerNorm to (1, 0) and biases to 0: perturb so every step matters.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lm.modules():
            if isinstance(m, nn.Embedding):
                m.weight.add_(0.05 * torch.randn(m.weight.shape[0], 1, generator=g))
            elif isinstance(m, nn.LayerNorm):
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif type(m).__name__ == "Conv1D":
                m.bias.add_(0.02 * torch.randn(m.bias.shape, generator=g))
    model = HFLogits(lm).eval()
    return model, example_inputs(cfg.vocab_size)
