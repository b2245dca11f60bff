"""Tiny decoder-only language models, one per way RMSNorm is spelled in the wild.

Each model is the same small transformer (vocab 128, hidden 64, 2 layers, 4 heads of 16,
MLP 128); what differs is the RMSNorm source, copied from the family's reference code, because
the ONNX graph the exporter emits depends on the exact spelling (Pow vs Mul, rsqrt vs
Div(Sqrt) vs Pow(-0.5), where the Casts sit, whether the weight is multiplied before or after
the cast back). Norm weights are random (not ones, not zeros) so a fused graph that drops or
misplaces the scale gives different outputs.

Use: ``ZOO[name].build()`` and ``ZOO[name].example_inputs()``, ``factory(name)``, or one of the
module-level factories (``--factory models.zoo:llama``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
MLP = 128
MAX_POSITIONS = 64  # learned position tables; sequences may not be longer
SEED = 0

DYNAMO_OPSETS = (17, 18, 20, 23)
TORCHSCRIPT_OPSETS = (17, 18, 20)  # the TorchScript exporter stops at opset 20

_NO_TORCHSCRIPT_RMS_NORM = (
    "the TorchScript exporter has no symbolic for aten::rms_norm "
    "(torch.onnx.errors.UnsupportedOperatorError: Exporting the operator 'aten::rms_norm' "
    "to ONNX opset version N is not supported)"
)


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo. ``build()`` is seeded (two builds are identical) and in eval mode;
    ``example_inputs()`` gives the forward's keyword arguments; ``num_norms`` counts norm
    applications per forward (a norm module called twice counts twice)."""

    name: str
    build: Callable[[], nn.Module]  # deterministic (seeded) construction, eval mode
    example_inputs: Callable[[], dict[str, torch.Tensor]]  # {"input_ids": int64 [2, 16]}
    num_norms: int  # RMSNorm applications per forward (each call site once)
    description: str
    eps: float | None = None  # the epsilon every norm in the model uses
    # (exporter, opset) -> why that export cannot work; exporter is "dynamo" or "torchscript"
    unsupported: Mapping[tuple[str, int], str] = field(default_factory=dict, compare=False)

    def supports(self, exporter: str, opset: int) -> bool:
        return (exporter, opset) not in self.unsupported


# --------------------------------------------------------------------------------------------
# The norms, spelled as their reference code spells them.


class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm (also Mistral, Qwen2, Qwen3, DeepSeek): cast back, then scale."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """transformers' GemmaRMSNorm: scale is (1 + weight), applied in fp32 before the cast back."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class Olmo2RMSNorm(nn.Module):
    """transformers' Olmo2RMSNorm: like Llama, but the weight is multiplied before the cast back."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hidden_states).to(input_dtype)


class T5LayerNorm(nn.Module):
    """transformers' T5LayerNorm: variance in fp32, normalises the un-cast input."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class FunctionalRMSNorm(nn.Module):
    """``torch.nn.functional.rms_norm`` called from a hand-written module."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.normalized_shape = (dim,)
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class TutorialRMSNorm(nn.Module):
    """The blog-post RMSNorm: ``gamma``, everything in fp32, scale after the cast back."""

    def __init__(self, d, eps=1e-8):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return (
            x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        ).type_as(x) * self.gamma


class BiasRMSNorm(nn.Module):
    """RMSNorm with a bias; square as x*x, mean via torch.mean, divide by sqrt."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps) * self.g + self.b


class NonParametricRMSNorm(nn.Module):
    """RMSNorm with no scale at all."""

    def __init__(self, d=None, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class PowHalfRMSNorm(nn.Module):
    """The inverse root spelled as ``pow(-0.5)``."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * (x.pow(2).mean(-1, keepdim=True) + self.eps).pow(-0.5) * self.weight


NORM_CLASSES: tuple[type[nn.Module], ...] = (
    LlamaRMSNorm,
    GemmaRMSNorm,
    Olmo2RMSNorm,
    T5LayerNorm,
    FunctionalRMSNorm,
    TutorialRMSNorm,
    BiasRMSNorm,
    NonParametricRMSNorm,
    PowHalfRMSNorm,
    nn.RMSNorm,
)


def is_norm_module(module: nn.Module) -> bool:
    """A zoo norm, torch.nn.RMSNorm, or a transformers *RMSNorm / T5LayerNorm."""
    name = type(module).__name__
    return isinstance(module, NORM_CLASSES) or name.endswith("RMSNorm") or name == "T5LayerNorm"


def count_norm_calls(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
    """How many times the forward on ``inputs`` calls a norm module (forward hooks)."""
    calls = 0

    def hook(*_):
        nonlocal calls
        calls += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_norm_module(m)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def randomize_norm_params_(model: nn.Module) -> None:
    """Give every norm scale 1 + 0.1·N(0,1) (Gemma's offset weight 0.1·N(0,1)), every bias 0.1·N(0,1).

    Uses the global RNG: call inside the seeded construction.
    """
    with torch.no_grad():
        for module in model.modules():
            if not is_norm_module(module):
                continue
            for name, param in module.named_parameters(recurse=False):
                noise = 0.1 * torch.randn(param.shape, dtype=param.dtype)
                # Gemma-style norms scale by (1 + weight); transformers names those *Gemma*RMSNorm
                offset = name == "b" or "Gemma" in type(module).__name__
                param.copy_(noise if offset else 1.0 + noise)


# --------------------------------------------------------------------------------------------
# The transformer around the norms.


@dataclass(frozen=True)
class Arch:
    make_norm: Callable[[int], nn.Module]  # dim -> norm module
    block: str = "pre"  # "pre": x + f(norm(x)); "post" (OLMo 2): x + norm(f(x))
    positions: str = "rotary"  # "rotary" or "learned"
    mlp: str = "swiglu"  # "swiglu", "geglu" (Gemma), "relu" (T5)
    qk_norm: str = "none"  # "none", "proj" (OLMo 2: over q_proj's full width), "head" (Qwen3: per head)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden)
    tie_embeddings: bool = False


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.qk_norm = arch.qk_norm
        if arch.qk_norm != "none":
            width = HIDDEN if arch.qk_norm == "proj" else HEAD_DIM
            self.q_norm = arch.make_norm(width)
            self.k_norm = arch.make_norm(width)

    def forward(self, x, rotary):
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm == "head":  # on [B, H, T, Dh], over Dh
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(HEAD_DIM))
        pos = torch.arange(seq, device=x.device)
        future = pos[None, :] > pos[:, None]  # causal mask from the input's shape
        scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, HIDDEN))


class MLPBlock(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "relu":
            self.wi = nn.Linear(HIDDEN, MLP, bias=False)
            self.wo = nn.Linear(MLP, HIDDEN, bias=False)
        else:
            self.gate_proj = nn.Linear(HIDDEN, MLP, bias=False)
            self.up_proj = nn.Linear(HIDDEN, MLP, bias=False)
            self.down_proj = nn.Linear(MLP, HIDDEN, bias=False)

    def forward(self, x):
        if self.kind == "relu":
            return self.wo(F.relu(self.wi(x)))
        gate = self.gate_proj(x)
        act = F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(act * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.post = arch.block == "post"
        self.self_attn = Attention(arch)
        self.mlp = MLPBlock(arch.mlp)
        if self.post:
            self.post_attention_layernorm = arch.make_norm(HIDDEN)
            self.post_feedforward_layernorm = arch.make_norm(HIDDEN)
        else:
            self.input_layernorm = arch.make_norm(HIDDEN)
            self.post_attention_layernorm = arch.make_norm(HIDDEN)

    def forward(self, x, rotary):
        if self.post:
            x = x + self.post_attention_layernorm(self.self_attn(x, rotary))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), rotary)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLM(nn.Module):
    """input_ids int64 [B, T] -> logits [B, T, VOCAB]; B and T are free (T <= 64 with learned positions)."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.embed_scale = math.sqrt(HIDDEN) if arch.embed_scale else None
        self.rotary = arch.positions == "rotary"
        if self.rotary:
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        else:
            self.embed_positions = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.layers = nn.ModuleList(Block(arch) for _ in range(LAYERS))
        self.norm = arch.make_norm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if arch.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids):
        seq = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        pos = torch.arange(seq, device=input_ids.device)
        rotary = None
        if self.rotary:
            freqs = pos[:, None].float() * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            rotary = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        else:
            x = x + self.embed_positions(pos)
        for layer in self.layers:
            x = layer(x, rotary)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------------------------
# The zoo.


def _builder(arch: Arch, seed: int = SEED) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = TinyLM(arch)
            randomize_norm_params_(model)
        return model.eval()

    return build


def example_inputs(batch: int = 2, seq: int = 16, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Token ids int64 [batch, seq]. Batch 2: torch.export specialises dimensions of size 1."""
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen, dtype=torch.int64)}


def _norm_count(qk: bool = False) -> int:
    per_layer = 2 + (2 if qk else 0)
    return LAYERS * per_layer + 1  # + the final norm


def _entry(name, arch, num_norms, description, eps, unsupported=None) -> ZooEntry:
    return ZooEntry(
        name=name,
        build=_builder(arch),
        example_inputs=example_inputs,
        num_norms=num_norms,
        description=description,
        eps=eps,
        unsupported=dict(unsupported or {}),
    )


_NO_TS = {("torchscript", opset): _NO_TORCHSCRIPT_RMS_NORM for opset in TORCHSCRIPT_OPSETS}
_FP32_EPS = torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None) uses finfo(x.dtype).eps

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        _entry(
            "llama",
            Arch(lambda d: LlamaRMSNorm(d, eps=1e-5)),
            _norm_count(),
            "Llama/Mistral/Qwen2 LlamaRMSNorm (cast to fp32, pow, mean, rsqrt, cast back, weight *), "
            "rotary, SwiGLU",
            1e-5,
        ),
        _entry(
            "gemma",
            Arch(lambda d: GemmaRMSNorm(d, eps=1e-6), mlp="geglu", embed_scale=True, tie_embeddings=True),
            _norm_count(),
            "GemmaRMSNorm (x.float(), scale (1 + weight) in fp32, type_as), rotary, GeGLU, "
            "sqrt(hidden) embedding scale, tied embeddings",
            1e-6,
        ),
        _entry(
            "olmo2",
            Arch(lambda d: Olmo2RMSNorm(d, eps=1e-6), block="post", qk_norm="proj"),
            _norm_count(qk=True),
            "OLMo 2: Olmo2RMSNorm ((weight * h).to(input_dtype)), post-norm blocks, q/k norm over "
            "the full projection width (64) before the head split",
            1e-6,
        ),
        _entry(
            "t5",
            Arch(lambda d: T5LayerNorm(d, eps=1e-6), positions="learned", mlp="relu"),
            _norm_count(),
            "T5LayerNorm (variance from x.to(fp32), normalises x itself, weight *), learned "
            "positions, ReLU MLP",
            1e-6,
        ),
        _entry(
            "torch_rmsnorm",
            Arch(lambda d: nn.RMSNorm(d)),
            _norm_count(),
            "torch.nn.RMSNorm with its default eps=None (finfo(float32).eps), rotary, SwiGLU",
            _FP32_EPS,
            _NO_TS,
        ),
        _entry(
            "f_rms_norm",
            Arch(lambda d: FunctionalRMSNorm(d, eps=1e-5)),
            _norm_count(),
            "torch.nn.functional.rms_norm(x, (d,), weight, 1e-5) in a module, rotary, SwiGLU",
            1e-5,
            _NO_TS,
        ),
        # eps <= 1e-8 (tutorial, nonparametric): the dynamo exporter's default optimizer drops the
        # `+ eps` Add (onnxscript's add_0 rule matches constants within abs_tol 1e-8 of 0), so
        # those exports have no eps at all and are not fused to RMSNormalization at opset 23.
        _entry(
            "tutorial",
            Arch(lambda d: TutorialRMSNorm(d, eps=1e-8), positions="learned"),
            _norm_count(),
            "tutorial RMSNorm: gamma, (x.float() * rsqrt(x.float().pow(2).mean + eps)).type_as(x) "
            "* gamma, learned positions",
            1e-8,
        ),
        _entry(
            "with_bias",
            Arch(lambda d: BiasRMSNorm(d, eps=1e-5), positions="learned"),
            _norm_count(),
            "x / sqrt(mean(x * x) + eps) * g + b: Mul square, Div by Sqrt, a bias; learned positions",
            1e-5,
        ),
        _entry(
            "nonparametric",
            Arch(lambda d: NonParametricRMSNorm(d, eps=1e-12)),
            _norm_count(),
            "x * rsqrt(x.pow(2).mean + 1e-12), no weight; rotary, SwiGLU",
            1e-12,
        ),
        _entry(
            "qk_norm",
            Arch(lambda d: LlamaRMSNorm(d, eps=1e-6), qk_norm="head"),
            _norm_count(qk=True),
            "Qwen3-style: LlamaRMSNorm blocks plus per-head q/k norm on [B, H, T, 16] over the last dim",
            1e-6,
        ),
        _entry(
            "pow_half",
            Arch(lambda d: PowHalfRMSNorm(d, eps=1e-2)),
            _norm_count(),
            "x * (x.pow(2).mean + 1e-2).pow(-0.5) * w: inverse root as Pow(-0.5), large eps",
            1e-2,
        ),
    ]
}


def factory(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(model, example inputs) for a zoo entry."""
    try:
        entry = ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; have {', '.join(ZOO)}") from None
    return entry.build(), entry.example_inputs()


def module_factories(factory: Callable, names) -> dict[str, Callable]:
    """One zero-argument function per name, for `--factory MODULE:<name>`."""

    def make_one(name):
        def make():
            return factory(name)

        make.__name__ = make.__qualname__ = name
        return make

    return {name: make_one(name) for name in names}


# Factories for `--factory models.zoo:<name>`, one per entry (llama, gemma, olmo2, ...).
globals().update(module_factories(factory, ZOO))
