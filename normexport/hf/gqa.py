"""KV-cache decoders whose attention is one onnxruntime ``GroupQueryAttention`` per layer.

The contract is onnxruntime-genai's for GroupQueryAttention models (what its model builder
writes):

    inputs   input_ids [batch, sequence]  attention_mask [batch, total_sequence]
             past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim]
    outputs  logits [batch, 1, vocab]  present.{i}.key / .value [batch, kv_heads, total_sequence, head_dim]

There is no ``position_ids`` input: the op applies the rotary embedding itself (``do_rotary``
with cos/sin caches computed from the model's own rotary module), at the positions that follow
from ``seqlens_k`` = attention_mask.sum(-1) - 1 and ``total_sequence_length`` =
attention_mask.shape[1]. Rows are unpadded or right-padded (a left-padded row needs the
generic attention graph). The logits are each row's last token's, at min(seqlens_k,
sequence - 1) in the step: a right-padded prompt's last real token, and the last column after
a past (new tokens after a past are all real in this contract). The past may be the exact past
(present = past + new) or a buffer of the context length shared with the present
(onnxruntime-genai's ``past_present_share_buffer``).

The graph is exported directly in this form: during the export each attention module's forward
is replaced by one that projects Q, K and V with one packed MatMul and hands them to
``GroupQueryAttention`` (``torch.onnx.ops.symbolic_multi_out``); the model's own rotary and mask
code is then dead and leaves the graph. The reference the export is checked against is the
unchanged transformers model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from normexport.hf.kv_export import EXPORT_OPSET, KVLayout, LastTokenLogits, cache_kwarg, kv_layout

ATTENTION_CLASSES = {"LlamaAttention", "Qwen2Attention", "MistralAttention"}  # q/k/v/o Linears, rotate-half rotary, SDPA
POSITION_ONLY_ROPE = {"default", "linear", "llama3", "yarn"}  # cos/sin depend on the position alone


@dataclass
class GQAPlan:
    """What the GroupQueryAttention export needs, read from the model."""

    layout: KVLayout
    num_heads: int
    scale: float
    windows: list[int]  # local_window_size per layer (-1: the whole past)
    max_positions: int

    def decoder(self, model: nn.Module, all_logits: bool = False) -> "GQADecoder":
        """The export wrapper of ``model`` with every attention layer one GroupQueryAttention
        (the logits of each row's last token, or of every position with ``all_logits``)."""
        return GQADecoder(model, self, all_logits)


def gqa_plan(hf) -> tuple[GQAPlan | None, str]:
    """(plan, "") where every layer's attention fits GroupQueryAttention exactly, else (None, the reason)."""
    if hf.task != "text-generation-with-past":
        return None, f"GroupQueryAttention needs the KV cache (task {hf.task})"
    cfg = hf.text_config
    attns = [m for m in hf.module.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "o_proj")]
    kinds = {type(m).__name__ for m in attns}
    if not attns or not kinds <= ATTENTION_CLASSES:
        return None, f"{', '.join(sorted(kinds)) or 'no attention module'}: GroupQueryAttention is exported for {', '.join(sorted(ATTENTION_CLASSES))} only"
    if len(attns) != cfg.num_hidden_layers or [m.layer_idx for m in attns] != list(range(len(attns))):
        return None, "the attention modules are not one per layer in order"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in POSITION_ONLY_ROPE:
        return None, f"rope_type {rope_type!r}: its cos/sin depend on more than the position"
    if float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        return None, "partial rotary embedding"
    if getattr(cfg, "attn_logit_softcapping", None):
        return None, "attention logit softcapping"
    layout = kv_layout(cfg)
    if layout.head_dim % 2 or cfg.num_attention_heads % layout.kv_heads:
        return None, f"head_dim {layout.head_dim} / heads {cfg.num_attention_heads} over {layout.kv_heads} KV heads do not fit"
    scales = {float(m.scaling) for m in attns}
    if len(scales) != 1:
        return None, "the attention scale differs between layers"
    max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if max_positions <= 0:
        return None, "no max_position_embeddings: the rotary cache has no length"
    windows = []
    for m in attns:
        window = getattr(m, "sliding_window", getattr(cfg, "sliding_window", None))
        # key j is seen from query i when i - j < window, in transformers' mask and in local_window_size alike (tested)
        windows.append(-1 if not window or window >= max_positions else int(window))
    return GQAPlan(layout, cfg.num_attention_heads, scales.pop(), windows, max_positions), ""


def rotary_caches(module: nn.Module, plan: GQAPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim / 2] from the model's own rotary module (scaling and
    attention factor included), in the rotate-half layout GroupQueryAttention expects."""
    rotary = next(m for m in module.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    dtype = next(module.parameters()).dtype
    pos = torch.arange(plan.max_positions).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=dtype), pos)
    half = plan.layout.head_dim // 2
    cos, sin = cos[0].to(dtype), sin[0].to(dtype)
    if cos.shape[-1] != 2 * half or not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        raise ValueError("the rotary embedding is not in the rotate-half layout")
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()


def packed_qkv(attn: nn.Module) -> nn.Linear:
    """q/k/v projections as one Linear; a bias that is zero everywhere is left out (exact)."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight.detach() for p in projs])
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    biases = [p.bias for p in projs]
    if any(b is not None for b in biases):
        bias = torch.cat([(b.detach() if b is not None else torch.zeros(p.out_features, dtype=weight.dtype)) for b, p in zip(biases, projs)])
        if bool(bias.ne(0).any()):
            linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class GQADecoder(nn.Module):
    """forward(input_ids, attention_mask, *past) -> (logits, *present), every attention layer
    one GroupQueryAttention (while ``patched()`` is active, i.e. during the export)."""

    def __init__(self, model: nn.Module, plan: GQAPlan, all_logits: bool = False):
        super().__init__()
        self.model = model
        self.plan = plan
        self.last = None if all_logits else LastTokenLogits(model)
        self.cache_kwarg = cache_kwarg(model)
        self.attns = [m for m in model.modules() if type(m).__name__ in ATTENTION_CLASSES]
        self.qkv_proj = nn.ModuleList(packed_qkv(m) for m in self.attns)
        cos, sin = rotary_caches(model, plan)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)
        self._step: dict = {}

    @contextlib.contextmanager
    def patched(self):
        saved = [m.__dict__.get("forward") for m in self.attns]
        for i, m in enumerate(self.attns):
            m.forward = (lambda idx, o_proj: lambda hidden_states, *args, **kwargs: (o_proj(self._attention(idx, hidden_states)), None))(i, m.o_proj)
        try:
            yield self
        finally:
            for m, f in zip(self.attns, saved):
                if f is None:
                    del m.forward
                else:
                    m.forward = f

    def _attention(self, idx: int, hidden: torch.Tensor) -> torch.Tensor:
        step, plan = self._step, self.plan
        past_k, past_v = step["past"][2 * idx], step["past"][2 * idx + 1]
        batch, seq = hidden.shape[0], hidden.shape[1]
        total = past_k.shape[2] + seq
        kv_shape = (batch, plan.layout.kv_heads, total, plan.layout.head_dim)
        out, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::GroupQueryAttention",
            [self.qkv_proj[idx](hidden), None, None, past_k, past_v, step["seqlens_k"], step["total"], self.cos_cache, self.sin_cache],
            dict(num_heads=plan.num_heads, kv_num_heads=plan.layout.kv_heads, scale=plan.scale, local_window_size=plan.windows[idx], do_rotary=1, rotary_interleaved=0, softcap=0.0),
            dtypes=(hidden.dtype, past_k.dtype, past_v.dtype),
            shapes=((batch, seq, plan.num_heads * plan.layout.head_dim), kv_shape, kv_shape),
            version=1,
        )
        step["present"][2 * idx], step["present"][2 * idx + 1] = present_k, present_v
        return out

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        ends = attention_mask.sum(dim=1) - 1  # each row's last position in the whole sequence
        seqlens_k = ends.to(torch.int32)
        total = _dim(attention_mask, 1).to(torch.int32)  # a 1-element tensor, as the op takes it
        self._step = {"past": past, "present": [None] * len(past), "seqlens_k": seqlens_k, "total": total}
        cache = DynamicCache(list(zip(past[0::2], past[1::2])))
        # In this contract (rows unpadded or right-padded, a past only under new tokens that are
        # all real) a row's last token in this step is at min(ends, sequence - 1).
        last = torch.minimum(ends, _dim(input_ids, 1) - 1)
        try:
            with self.last.rows(attention_mask, input_ids.shape[1], last) if self.last else contextlib.nullcontext():
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, return_dict=True, **{self.cache_kwarg: cache})
            return (out.logits, *self._step["present"])
        finally:
            self._step = {}


def _dim(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x.shape[axis]`` as a [1] int64 tensor: one ONNX Shape node (start/end), where a Python
    size becomes Shape + Squeeze (export only, as the whole decoder)."""
    return torch.onnx.ops.symbolic("::Shape", [x], dict(start=axis, end=axis + 1), dtype=torch.int64, shape=(1,), version=EXPORT_OPSET)
