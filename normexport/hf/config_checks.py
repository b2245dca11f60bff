"""Checks on a Hugging Face folder's config.json before transformers builds anything from it.

- ``check_raw(config)``: the JSON as written. Sizes (hidden_size, heads, layers, vocabulary,
  ...) are positive integers (a per-layer list of them where a family allows one), counts of
  experts are non-negative integers, the dtype is one torch knows, in the top-level config
  and in every nested ``*_config``.
- ``check_built(config)``: the config transformers built. Its decoder text config is a
  config (not a dict), attention heads divide into key/value heads, and where the config
  gives no head size the hidden size divides into the heads.
- ``check_fits(...)``: the folder's weights against its config and the machine. The config's
  layer count is matched against the layers the weights hold, and the model's parameter bytes,
  estimated from the config (a lower bound) and from the safetensors headers (exact for what is
  stored), must fit in the memory available now.
- ``check_against_weights(shapes, ...)``: the model the config builds on the meta device
  against the weights stored under the same names (shape for shape), and its exact size
  against the memory available.

Every refusal is a NormexportError (exit 2) naming the field, before any tensor is allocated.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from normexport.errors import NormexportError, first_line

# Fields that give a size: a positive integer, or (per-layer families) a list of them.
SIZE_FIELDS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
    "vocab_size", "head_dim", "max_position_embeddings", "moe_intermediate_size",
    "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers",
    "n_embd", "n_head", "n_layer", "n_positions", "n_inner", "kv_channels",
)
# Counts that may be zero (a dense model's experts).
COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "n_shared_experts")
DTYPE_FIELDS = ("torch_dtype", "dtype")
DTYPE_WORDS = ("auto",)
HEAD_SIZE_FIELDS = ("head_dim", "d_kv", "kv_channels", "attention_head_dim", "head_size", "qk_head_dim", "qk_nope_head_dim")
HINT = "fix config.json (save the model again with save_pretrained)"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|block|blocks)\.(\d+)\.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _where(prefix: str, key: str) -> str:
    return f"{prefix}{key}" if not prefix else f"{prefix}.{key}"


def check_raw(config: dict, source: str, prefix: str = "") -> None:
    """Types and ranges of the size, count and dtype fields of ``config`` (and nested configs)."""
    for key in SIZE_FIELDS:
        v = config.get(key)
        if v is None:
            continue
        ok = (_is_int(v) and v > 0) or (isinstance(v, list) and v and all(_is_int(x) and x > 0 for x in v))
        if not ok:
            raise NormexportError(f"{source}: {_where(prefix, key)} is {json.dumps(v)[:80]}, not a positive integer", HINT)
    for key in COUNT_FIELDS:
        v = config.get(key)
        if v is not None and not (_is_int(v) and v >= 0):
            raise NormexportError(f"{source}: {_where(prefix, key)} is {json.dumps(v)[:80]}, not a non-negative integer", HINT)
    for key in DTYPE_FIELDS:
        v = config.get(key)
        if v is not None and not _known_dtype(v):
            raise NormexportError(f"{source}: {_where(prefix, key)} is {json.dumps(v)[:80]}, not a torch dtype", f"{HINT}; e.g. \"float32\", \"bfloat16\" or \"float16\"")
    for key, v in config.items():
        if isinstance(v, dict) and (key.endswith("_config") or key in ("encoder", "decoder")):
            check_raw(v, source, _where(prefix, key))


def _known_dtype(value) -> bool:
    import torch

    if not isinstance(value, str):
        return False
    name = value.removeprefix("torch.")
    return name in DTYPE_WORDS or isinstance(getattr(torch, name, None), torch.dtype)


def text_config(config, source: str):
    """The decoder text config transformers gives for ``config``; a dict where a config
    belongs (a nested ``text_config`` on a family without one) is refused."""
    from transformers import PretrainedConfig

    try:
        text = config.get_text_config(decoder=True)
    except Exception as e:
        raise NormexportError(f"{source}: transformers cannot read its text config ({first_line(e)})", HINT) from None
    if not isinstance(text, PretrainedConfig):
        raise NormexportError(f"{source}: its text config is a {type(text).__name__}, not a config ({type(config).__name__} takes no nested text_config)", HINT)
    return text


def check_built(config, raw: dict, source: str) -> None:
    """Heads divide as attention needs them to, on the built decoder text config."""
    text = text_config(config, source)
    raw_text = _raw_text(raw)
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None)
    hidden = getattr(text, "hidden_size", None)
    for name, v in (("num_attention_heads", heads), ("num_key_value_heads", kv), ("hidden_size", hidden)):
        if v is not None and _is_int(v) and v <= 0:
            raise NormexportError(f"{source}: {name} is {v}, not a positive integer", HINT)
    if _is_int(heads) and _is_int(kv) and heads % kv:
        raise NormexportError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}", "each key/value head serves a whole group of attention heads: " + HINT)
    if _is_int(heads) and _is_int(hidden) and not any(raw_text.get(k) for k in HEAD_SIZE_FIELDS) and hidden % heads:
        raise NormexportError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and no head_dim is given", "give head_dim, or " + HINT)


def _raw_text(raw: dict) -> dict:
    for key in ("text_config", "decoder"):
        if isinstance(raw.get(key), dict):
            return raw[key]
    return raw


# ---------------------------------------------------------------------------------------------
# Sizes


def _int(cfg, *names, default=0) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if _is_int(v):
            return v
    return default


def estimate_parameters(text) -> int:
    """A lower bound on the decoder's parameter count from its config: the token embedding,
    and per layer the attention projections and a two-matrix MLP (or the experts of an MoE
    layer, whichever is smaller). Norms, biases, gates and other towers are left out."""
    hidden = _int(text, "hidden_size")
    layers = _int(text, "num_hidden_layers")
    vocab = _int(text, "vocab_size")
    heads = _int(text, "num_attention_heads", default=1)
    kv = _int(text, "num_key_value_heads", default=heads)
    head = _int(text, "head_dim", "d_kv", default=hidden // max(heads, 1))
    attention = 2 * hidden * heads * head + 2 * hidden * kv * head
    inter = getattr(text, "intermediate_size", None)
    if isinstance(inter, list) and all(_is_int(x) for x in inter):
        mlp_total = 2 * hidden * sum(inter)
    else:
        mlp = 2 * hidden * _int(text, "intermediate_size", "d_ff")
        experts = _int(text, "num_experts", "num_local_experts", "n_routed_experts")
        expert_size = _int(text, "moe_intermediate_size", "intermediate_size")
        if experts and expert_size:
            mlp = min(mlp, 2 * hidden * experts * expert_size) if mlp else 2 * hidden * experts * expert_size
        mlp_total = layers * mlp
    return vocab * hidden + layers * attention + mlp_total


def safetensors_tensors(path: Path) -> dict[str, list[int]] | None:
    """Name -> shape of every tensor in the folder's safetensors files, from their headers
    only; None where a header cannot be read (transformers then reports the file)."""
    shapes: dict[str, list[int]] = {}
    files = sorted(p for p in Path(path).iterdir() if p.name.endswith(".safetensors") and p.is_file())
    for p in files:
        try:
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER_BYTES:
                    return None
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError):
            return None
        if not isinstance(header, dict):
            return None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                return None
            shapes[name] = shape
    return shapes


def pickle_tensors(path: Path) -> dict[str, list[int]] | None:
    """Name -> shape of every tensor in the folder's ``.bin`` files, read with
    ``weights_only=True`` onto the meta device (no data is read); None where one does not load
    that way (transformers then reports it)."""
    import torch

    shapes: dict[str, list[int]] = {}
    for p in sorted(p for p in Path(path).iterdir() if p.name.endswith(".bin") and p.is_file()):
        try:
            state = torch.load(p, map_location="meta", weights_only=True, mmap=True)
        except Exception:
            return None
        if not isinstance(state, dict):
            return None
        for name, t in state.items():
            if isinstance(t, torch.Tensor):
                shapes[str(name)] = list(t.shape)
    return shapes


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, within the cgroup's limit."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            import psutil

            found.append(psutil.virtual_memory().available)
        except Exception:
            return None
    return min(found)


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def check_fits(path: Path, text, dtype_bytes: int, source: str, memory: int | None = None, tensors: dict | None = None) -> int:
    """Refuse a config whose layers the weights do not hold, or whose parameters cannot fit in
    memory now; returns the estimated parameter bytes."""
    if tensors is None:
        tensors = safetensors_tensors(path) if any(p.name.endswith(".safetensors") for p in Path(path).iterdir()) else None
    layers = _int(text, "num_hidden_layers")
    if tensors and layers:
        indices = [int(m.group(1)) for name in tensors for m in [_LAYER_INDEX.search(name)] if m]
        if indices and max(indices) + 1 < layers:
            raise NormexportError(
                f"{source}: num_hidden_layers is {layers}, but the weights hold layers 0..{max(indices)} only",
                "config.json and the weights belong to different models: " + HINT,
            )
    stored = sum(math.prod(shape) for shape in (tensors or {}).values())
    params = max(stored, estimate_parameters(text))
    return _require_memory(params, dtype_bytes, memory, lambda need: f"{source}: the model needs at least {need} for its parameters (about {params:.3g} at {dtype_bytes} bytes each)")



def check_against_weights(shapes: dict[str, tuple], tensors: dict[str, list[int]] | None, dtype_bytes: int, source: str, memory: int | None = None) -> int:
    """The model as the config builds it (``shapes``: name -> shape of its parameters and
    buffers, built on the meta device) against the weights stored under the same names, and
    its exact size against the memory available. Returns its bytes."""
    for name, shape in (tensors or {}).items():
        want = shapes.get(name)
        if want is not None and tuple(want) != tuple(shape):
            raise NormexportError(
                f"{source}: the config makes {name} of shape {list(want)}, the weights hold {list(shape)}",
                "config.json and the weights belong to different models: " + HINT,
            )
    count = sum(math.prod(shape) for shape in shapes.values())
    return _require_memory(count, dtype_bytes, memory, lambda need: f"{source}: the model needs {need} for its parameters ({count:.3g} at {dtype_bytes} bytes each)")


def _require_memory(params: int, dtype_bytes: int, memory: int | None, what) -> int:
    """``params`` parameters of ``dtype_bytes`` each must fit in ``memory`` (None: the memory
    available now); ``what(size)`` starts the error. Returns the bytes."""
    need = params * dtype_bytes
    memory = available_memory() if memory is None else memory
    if memory is not None and need > memory:
        raise NormexportError(f"{what(_gib(need))}, {_gib(memory)} of memory is available",
                              "convert on a machine with more memory, or in a smaller --dtype")
    return need
