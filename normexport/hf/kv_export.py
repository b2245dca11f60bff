"""Export a transformers model as an ONNX decoder with its KV cache (or without one).

The contract is onnxruntime-genai's (Optimum's too, whose logits hold every position):

    inputs   input_ids [batch, sequence]  attention_mask [batch, total_sequence]
             position_ids [batch, sequence]
             past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim]
    outputs  logits [batch, 1, vocab]  present.{i}.key / .value [batch, kv_heads, total_sequence, head_dim]

batch, sequence and past_sequence are dynamic; past_sequence is 0 for the first step. Every
layer keeps its whole past (sliding-window layers too: the mask, built from the positions,
hides what lies outside the window), so one graph serves prefill and decode.

The logits are those of each row's last token only (``LastTokenLogits``): the LM head reads one
position per row, not the whole prompt, which is all a generation step uses (onnxruntime-genai
reads a logits output of sequence 1 as such). The last token of a row is its last position with
attention_mask 1 in this step's input, so rows padded on the right (onnxruntime-genai's batches)
and on the left both give their own (the GroupQueryAttention decoder, whose rows are unpadded
or right-padded, computes the same position from the mask's sum: normexport.hf.gqa).
``all_logits`` keeps every position ([batch, sequence, vocab]: scoring, perplexity, Optimum's
contract).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from normexport.hf.folder import HFModel

EXPORT_OPSET = 20


@dataclass
class KVLayout:
    """What the decoder's cache looks like, read from the config."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]


def kv_layout(cfg) -> KVLayout:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return KVLayout(cfg.num_hidden_layers, kv_heads, head_dim, cfg.vocab_size)


def cache_kwarg(module: nn.Module) -> str:
    """transformers 5 names the cache argument ``cache``; 4.x ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class LastTokenLogits:
    """While active (``rows(attention_mask, sequence)``), the model's LM head reads only each
    row's last token: a forward pre-hook on ``get_output_embeddings()`` gathers, from its input
    [batch, sequence, hidden], the last position whose attention_mask is 1 in this step (or the
    positions ``last`` given). What the model does after the head (a logit soft-cap, a scale)
    applies to that row as it would to all. Exported, the gather is one ``GatherND`` over the
    batch (batch_dims 1)."""

    def __init__(self, model: nn.Module):
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.index: torch.Tensor | None = None

    @contextlib.contextmanager
    def rows(self, attention_mask: torch.Tensor, sequence: int, last: torch.Tensor | None = None):
        """``last``: each row's position in this step ([batch] int64, a negative one counted
        from the end); by default the last position whose mask is 1 (0 where none)."""
        if self.head is None:
            yield
            return
        if last is None:
            last = attention_mask[:, -sequence:].cumsum(1).argmax(dim=1)  # the first maximum of the running count
        self.index = last.reshape(-1, 1, 1)
        handle = self.head.register_forward_pre_hook(self._gather)
        try:
            yield
        finally:
            handle.remove()
            self.index = None

    def _gather(self, module, args):
        hidden = args[0]
        if hidden.dim() != 3 or self.index is None:
            return None
        if torch.onnx.is_in_onnx_export():
            picked = torch.onnx.ops.symbolic(
                "::GatherND", [hidden, self.index], dict(batch_dims=1),
                dtype=hidden.dtype, shape=(hidden.shape[0], 1, hidden.shape[2]), version=EXPORT_OPSET,
            )
        else:
            index = self.index.remainder(hidden.shape[1])  # GatherND counts a negative index from the end
            picked = hidden.gather(1, index.expand(-1, 1, hidden.shape[2]))
        return (picked, *args[1:])


class DecoderWithPast(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), the past
    flat as (key0, value0, key1, value1, ...), rebuilt into a DynamicCache each call; the
    logits of each row's last token, or of every position with ``all_logits``."""

    def __init__(self, model: nn.Module, all_logits: bool = False):
        super().__init__()
        self.model = model
        self.cache_kwarg = cache_kwarg(model)
        self.last = None if all_logits else LastTokenLogits(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(list(zip(past[0::2], past[1::2])))
        with self.last.rows(attention_mask, input_ids.shape[1]) if self.last else contextlib.nullcontext():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, return_dict=True, **{self.cache_kwarg: cache})
        present = []
        for layer in output_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class DecoderNoCache(nn.Module):
    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, return_dict=True)
        return getattr(out, self.output)


@dataclass
class DecoderExport:
    model: ir.Model
    input_names: list[str]
    output_names: list[str]
    layout: KVLayout
    seconds: float
    notes: list[str] = field(default_factory=list)


def cache_shapes(module: nn.Module, layout: KVLayout) -> list[tuple[int, int]] | None:
    """(heads, dim) of each past input as the model's own cache holds it, from one forward of two
    tokens into an empty DynamicCache: a model whose cache is not the config's heads x head_dim
    (DeepSeek's multi-head latent attention caches its compressed latent) exports with its own.
    None where the model's cache does not have one key and one value per layer, or where the
    model does not run this forward (the export then says why)."""
    from transformers import DynamicCache

    try:
        with torch.inference_mode():
            out = module(input_ids=torch.tensor([[1, 2]]), use_cache=True, return_dict=True, **{cache_kwarg(module): DynamicCache()})
    except Exception:  # noqa: BLE001 - the model's own error surfaces, worded, from the export
        return None
    shapes = []
    for layer in output_cache(out).layers:
        shapes += [(int(t.shape[1]), int(t.shape[3])) for t in (layer.keys, layer.values)]
    return shapes if len(shapes) == len(layout.past_names) else None


def example_inputs(layout: KVLayout, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4, with_past: bool = True, seed: int = 0,
                   past_shapes: list[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feed = {
        "input_ids": torch.randint(0, layout.vocab_size, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, (past if with_past else 0) + seq, dtype=torch.int64),
        "position_ids": torch.arange(past if with_past else 0, (past if with_past else 0) + seq).expand(batch, seq).contiguous(),
    }
    if with_past:
        for name, (heads, dim) in zip(layout.past_names, past_shapes or [(layout.kv_heads, layout.head_dim)] * len(layout.past_names)):
            feed[name] = torch.randn(batch, heads, past, dim, generator=g).to(dtype)
    return feed


def export_decoder(hf: HFModel, attention_form: bool = False, gqa=None, all_logits: bool = False) -> DecoderExport:
    """torch.onnx (dynamo) export of the task's wrapper; batch, sequence and past dynamic.
    ``attention_form``: SDPA exported the way onnxruntime's attention fusions match it.
    ``gqa`` (a normexport.hf.gqa.GQAPlan): every attention layer one GroupQueryAttention, no
    position_ids input (normexport.hf.gqa). A decoder with a cache outputs the logits of each
    row's last token unless ``all_logits``.
    The model's initializers are views of the module's parameters (nothing is copied or written):
    keep the module alive until the model is saved."""
    from torch.export import Dim

    start = time.perf_counter()
    layout = kv_layout(hf.text_config)
    with_past = hf.task == "text-generation-with-past"
    patch = contextlib.nullcontext()
    if gqa is not None:
        wrapper, outputs = gqa.decoder(hf.module, all_logits), ["logits", *layout.present_names]
        patch = wrapper.patched()
    elif with_past:
        wrapper, outputs = DecoderWithPast(hf.module, all_logits), ["logits", *layout.present_names]
    elif hf.task == "text-generation":
        wrapper, outputs = DecoderNoCache(hf.module, "logits"), ["logits"]
    else:
        wrapper, outputs = DecoderNoCache(hf.module, "last_hidden_state"), ["last_hidden_state"]
    dtype = next(hf.module.parameters()).dtype
    feed = example_inputs(layout, dtype, with_past=with_past, past_shapes=cache_shapes(hf.module, layout) if with_past and gqa is None else None)
    d = Dim.DYNAMIC
    shapes = ({0: d, 1: d}, {0: d, 1: d}, {0: d, 1: d})
    if gqa is not None:
        del feed["position_ids"]
        shapes = shapes[:2]
    if with_past:
        shapes = (*shapes, tuple({0: d, 2: d} for _ in layout.past_names))
    from normexport.hf.ort_attention import export_patches

    with export_patches() if attention_form else contextlib.nullcontext(), patch:
        model = _run_export(wrapper, feed, outputs, shapes, hf)
    name_dims(model, with_past)
    return DecoderExport(model, list(feed), outputs, layout, time.perf_counter() - start)


def _run_export(wrapper: nn.Module, feed: dict, outputs: list[str], shapes, hf: HFModel) -> ir.Model:
    from normexport.export import _quiet, _raise_export_error

    with _quiet() as err:
        try:
            program = torch.onnx.export(
                wrapper.eval(), tuple(feed.values()), None, input_names=list(feed), output_names=outputs,
                dynamic_shapes=shapes, opset_version=EXPORT_OPSET, dynamo=True, optimize=True,
            )
        except Exception as e:
            _raise_export_error(
                f"torch.onnx cannot export {hf.architecture} ({hf.task})", e, err,
                "this architecture does not export with torch.onnx today; try --task text-generation (no cache) or another transformers version",
            )
    return program.model


def name_dims(model: ir.Model, with_past: bool) -> None:
    """The exporter's symbols (s10, s15 + s70) become the contract's names."""
    ins = {v.name: v for v in model.graph.inputs}
    outs = {v.name: v for v in model.graph.outputs}
    total = "total_sequence" if with_past else "sequence"

    def rename(value: ir.Value | None, names: dict[int, str]) -> None:
        if value is None or value.shape is None:
            return
        dims = list(value.shape)
        for i, n in names.items():
            if i < len(dims) and not isinstance(dims[i], int):
                dims[i] = ir.SymbolicDim(n)
        value.shape = ir.Shape(dims)

    rename(ins.get("input_ids"), {0: "batch", 1: "sequence"})
    rename(ins.get("position_ids"), {0: "batch", 1: "sequence"})
    rename(ins.get("attention_mask"), {0: "batch", 1: total})
    for name, v in ins.items():
        if name.startswith("past_key_values."):
            rename(v, {0: "batch", 2: "past_sequence"})
    for name, v in outs.items():
        if name.startswith("present."):
            rename(v, {0: "batch", 2: "total_sequence"})
        else:
            rename(v, {0: "batch", 1: "sequence"})


def count_rmsnorm_modules(module: nn.Module) -> int:
    """nn modules whose class name ends with RMSNorm: what the fused graph must account for."""
    return sum(1 for m in module.modules() if type(m).__name__.endswith("RMSNorm"))


def fresh_workdir(beside: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=".normexport-", dir=beside))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
