"""Model inputs: their specs (``--input NAME:DTYPE:SHAPE[:LOW,HIGH]``), the values each is
drawn from so that a run exercises the model, and calling a model with them by name.

Integer inputs:
- a range given (``--input NAME:DTYPE:SHAPE:LOW,HIGH``, or the factory's / file's example
  range, kept when ``--input`` only changes the shape) is used as given; where the input indexes
  an ``nn.Embedding`` it must lie within ``[0, num_embeddings)``;
- without a range, an input that indexes an embedding draws across its whole vocabulary
  ``[0, num_embeddings)``. The embedding is the one the input actually reaches: found by running
  the model once with a forward hook on every ``nn.Embedding`` and matching the tensor it gets
  to the input's storage (the input itself or a view of it), or from the graph's
  ``aten.embedding`` nodes for a torch.export archive. Tracing, not the first embedding, because
  a model has several (positions, token types, a decoder's own) and the first is often not the
  one an input feeds. Where no embedding is traced (TorchScript, an input transformed before
  the lookup), an input named like token ids (ends in ``ids`` or holds ``token``; not a
  position or type id) takes the model's first embedding;
- a name holding ``mask``: all ones (every position attended); a name holding ``position``:
  ``0 .. T-1`` along the last dim;
- any other integer input without a range is refused: give LOW,HIGH.
Float inputs draw N(0, 1) unless a range is given; bool inputs draw fair coins (masks: all True).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from normexport.errors import NormexportError

DTYPES = {
    "int64": "int64",
    "int32": "int32",
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bool": "bool",
}
INPUT_SYNTAX = "--input NAME:DTYPE:SHAPE[:LOW,HIGH], e.g. --input input_ids:int64:1x16:0,128"
_ITEMSIZE = {"int64": 8, "int32": 4, "float32": 4, "float16": 2, "bfloat16": 2, "bool": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 8)


def input_budget() -> int:
    """The most bytes one input's draw may take: a quarter of the machine's memory (each draw
    is held by PyTorch and the runtimes at once, several times over)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, dtype name, static shape, and the value range to draw from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    low: float | None = None
    high: float | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "low": self.low, "high": self.high}

    @classmethod
    def from_json(cls, d: dict) -> InputSpec:
        """From a model file's metadata: every flaw is the file's, reported as bad input."""
        try:
            spec = cls(str(d["name"]), DTYPES[str(d["dtype"])], tuple(int(s) for s in d["shape"]), d.get("low"), d.get("high"))
            if spec.low is not None or spec.high is not None:
                spec = replace(spec, low=float(spec.low), high=float(spec.high))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise NormexportError(
                f"the model file's input metadata is broken ({type(e).__name__}: {e} in {str(d)[:120]})",
                f"give the inputs with {INPUT_SYNTAX}",
            ) from e
        return spec.checked(f"the model file's input '{spec.name}'")

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float32", "float16", "bfloat16")

    def checked(self, where: str) -> InputSpec:
        """Refuse what cannot be drawn: empty shapes, ranges that are not finite, empty, or
        (for integer dtypes) not whole numbers within the dtype."""
        if not self.name:
            raise NormexportError(f"{where} has no name", f"use {INPUT_SYNTAX}")
        if any(d <= 0 for d in self.shape):
            raise NormexportError(f"{where} has shape {'x'.join(map(str, self.shape))} with no elements", "every dim must be >= 1")
        size = math.prod(self.shape) * _itemsize(self.dtype)
        if size > input_budget():
            raise NormexportError(
                f"{where} has shape {'x'.join(map(str, self.shape))}: {math.prod(self.shape):.3g} elements, {size / 2**30:.3g} GiB as {self.dtype}, more than a draw may take here ({input_budget() / 2**30:.3g} GiB, a quarter of this machine's memory)",
                "give a smaller shape with --input NAME:DTYPE:SHAPE",
            )
        if (self.low is None) != (self.high is None):
            raise NormexportError(f"{where} has only one end of its range", "give LOW,HIGH")
        if self.low is None:
            return self
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise NormexportError(f"{where} has a range that is not finite ({self.low:g},{self.high:g})", "give finite LOW,HIGH, e.g. -1,1")
        if not self.low < self.high:
            raise NormexportError(f"{where} has an empty range ({self.low:g},{self.high:g})", "LOW must be below HIGH")
        if self.dtype == "bool":
            raise NormexportError(f"{where} is bool and takes no range", "drop LOW,HIGH")
        if not self.is_float:
            bits = 63 if self.dtype == "int64" else 31
            if self.low != int(self.low) or self.high != int(self.high):
                raise NormexportError(f"{where} is {self.dtype} but its range ({self.low:g},{self.high:g}) is not whole numbers", "give integers: LOW,HIGH with HIGH excluded")
            if self.low < -(2**bits) or self.high > 2**bits:
                raise NormexportError(f"{where} has a range beyond {self.dtype}", f"stay within -2**{bits}..2**{bits}")
        elif self.dtype == "float16" and max(abs(self.low), abs(self.high)) > 65504:
            raise NormexportError(f"{where} is float16 but its range ({self.low:g},{self.high:g}) overflows float16", "stay within -65504,65504")
        return self


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|infinity|nan)"


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``NAME:DTYPE:SHAPE[:LOW,HIGH]``; raise NormexportError with the syntax on any flaw."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[0]:
        raise NormexportError(f"malformed --input '{text}'", f"use {INPUT_SYNTAX}")
    name, dtype, shape_text = parts[0], parts[1].lower(), parts[2]
    if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
        raise NormexportError(f"--input '{text}': '{name}' is not an argument name", f"name a parameter of the model's forward(): {INPUT_SYNTAX}")
    if dtype not in DTYPES:
        raise NormexportError(
            f"unknown dtype '{parts[1]}' in --input '{text}'", f"one of {', '.join(sorted(set(DTYPES.values())))}"
        )
    if not re.fullmatch(r"\d+(x\d+)*", shape_text):
        raise NormexportError(f"malformed shape '{shape_text}' in --input '{text}'", "dims as positive integers joined by 'x', e.g. 1x16")
    shape = tuple(int(s) for s in shape_text.split("x"))
    low = high = None
    if len(parts) == 4:
        m = re.fullmatch(rf"({_NUMBER}),({_NUMBER})", parts[3].strip(), re.IGNORECASE)
        if not m:
            raise NormexportError(f"malformed range '{parts[3]}' in --input '{text}'", "give LOW,HIGH as two numbers, e.g. 0,128")
        low, high = float(m.group(1)), float(m.group(2))
    return InputSpec(name, DTYPES[dtype], shape, low, high).checked(f"--input '{text}'")


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def spec_of(name: str, tensor) -> InputSpec:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in DTYPES.values():
        raise NormexportError(f"input '{name}' has unsupported dtype {dtype}", f"supported: {', '.join(sorted(set(DTYPES.values())))}")
    import torch

    low = high = None
    if is_mask(name) or is_position(name):
        pass  # masks draw ones and positions 0..T-1, not a range (normexport.inputs)
    elif not tensor.dtype.is_floating_point and tensor.dtype != torch.bool and tensor.numel():
        # Integer inputs are indices (token ids): never draw beyond what the example used.
        low, high = float(min(0, int(tensor.min()))), float(int(tensor.max()) + 1)
    return InputSpec(name, dtype, tuple(tensor.shape), low, high)


def make_inputs(specs: list[InputSpec], seed: int, scale: float = 1.0, unranged_zeros: bool = False) -> dict:
    """Seeded random tensors for ``specs`` (rules in normexport.inputs). Floats ~ N(0, scale²)
    unless a range is given; a draw that is not finite in the input's dtype is refused.
    ``unranged_zeros``: an integer input without a range is all zeros (id 0, in every
    vocabulary; for an export that compares nothing) instead of refused."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in specs:
        dt = torch_dtype(s.dtype)
        if s.dtype == "bool":
            out[s.name] = torch.ones(s.shape, dtype=torch.bool) if is_mask(s.name) else torch.rand(s.shape, generator=g) < 0.5
        elif s.is_float:
            if s.low is not None:
                t = torch.rand(s.shape, generator=g, dtype=torch.float64) * (s.high - s.low) + s.low
            else:
                t = torch.randn(s.shape, generator=g, dtype=torch.float64) * scale
            t = t.to(dt)
            if not bool(torch.isfinite(t).all()):
                raise NormexportError(
                    f"input '{s.name}' drawn at scale {scale:g} is not finite in {s.dtype}", "give a smaller range with --input NAME:DTYPE:SHAPE:LOW,HIGH"
                )
            out[s.name] = t
        elif s.low is not None:
            out[s.name] = torch.randint(int(s.low), int(s.high), s.shape, generator=g, dtype=dt)
        elif is_mask(s.name):
            out[s.name] = torch.ones(s.shape, dtype=dt)
        elif is_position(s.name):
            out[s.name] = positions(s.shape, dt)
        elif unranged_zeros:
            out[s.name] = torch.zeros(s.shape, dtype=dt)
        else:
            raise NormexportError(f"integer input '{s.name}' has no range to draw from", f"give it: --input {s.name}:{s.dtype}:{'x'.join(map(str, s.shape))}:LOW,HIGH")
    return out


VIEW_OPS = ("view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze", "contiguous", "clone", "alias")


def is_mask(name: str) -> bool:
    return "mask" in name.lower()


def is_position(name: str) -> bool:
    return "position" in name.lower()


def looks_like_token_ids(name: str) -> bool:
    n = name.lower()
    if is_mask(n) or is_position(n) or "type" in n:
        return False
    return n.endswith("ids") or "token" in n


def probe_inputs(specs) -> dict:
    """Inputs every model accepts: token 0, masks of ones, positions 0..T-1, float zeros."""
    import torch

    out = {}
    for s in specs:
        dt = torch_dtype(s.dtype)
        if s.dtype == "bool":
            out[s.name] = torch.ones(s.shape, dtype=torch.bool)
        elif s.is_float:
            out[s.name] = torch.zeros(s.shape, dtype=dt)
        elif is_mask(s.name):
            out[s.name] = torch.ones(s.shape, dtype=dt)
        elif is_position(s.name) and s.low is None:
            out[s.name] = positions(s.shape, dt)
        else:  # id 0 is in every vocabulary
            out[s.name] = torch.zeros(s.shape, dtype=dt)
    return out


def positions(shape, dtype):
    import torch

    if not shape:
        return torch.zeros((), dtype=dtype)
    return torch.arange(shape[-1], dtype=dtype).expand(*shape).contiguous()


def call_module(module, inputs: dict, positional: bool = False):
    """Call ``module`` with ``inputs`` bound by name: keywords for an nn.Module or a ScriptModule,
    the exported calling convention (positional, then its own keywords) for a torch.export module.
    ``positional``: a forward with no named parameters (``*args``) takes them in the given order."""
    if positional:
        return module(*inputs.values())
    in_spec = getattr(module, "_in_spec", None)
    children = (in_spec.children() if callable(getattr(in_spec, "children", None)) else in_spec.children_specs) if in_spec is not None else []
    if len(children) == 2:
        n_pos = children[0].num_children
        kw_names = list(children[1].context or [])
        values = list(inputs.values())
        pos = [v for k, v in inputs.items() if k not in kw_names][:n_pos] if kw_names else values[:n_pos]
        return module(*pos, **{k: inputs[k] for k in kw_names if k in inputs})
    return module(**inputs)


def traced_vocab_sizes(loaded, specs) -> dict[str, int]:
    """Input name -> num_embeddings of the embedding it indexes, where that can be traced.

    Runs the model once on ``probe_inputs`` (hooks on an nn.Module's embeddings; a torch.export
    archive's graph is read instead): that run also turns inputs the model cannot take (wrong
    shapes or dtypes, a missing input) into one clear error before any export."""
    import torch

    probe = probe_inputs(specs)
    storage = {name: t.untyped_storage().data_ptr() for name, t in probe.items() if not t.dtype.is_floating_point and t.numel()}
    found: dict[str, int] = {}
    handles = []
    if not isinstance(loaded.module, torch.jit.ScriptModule):
        for m in loaded.module.modules():
            if isinstance(m, torch.nn.Embedding):

                def hook(mod, args, found=found):
                    if args and isinstance(args[0], torch.Tensor) and args[0].numel():
                        ptr = args[0].untyped_storage().data_ptr()
                        for name, p in storage.items():
                            if p == ptr and name not in found:
                                found[name] = int(mod.num_embeddings)

                handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            call_module(loaded.module, probe, positional=not loaded.input_names)
    except Exception as e:
        shapes = ", ".join(f"{s.name}:{s.dtype}:{'x'.join(map(str, s.shape))}" for s in specs)
        raise NormexportError(
            f"the model cannot run on inputs {shapes}: {first_cause(e)}",
            "check the --input shapes and dtypes against the model's forward()",
        ) from e
    finally:
        for h in handles:
            h.remove()
    if loaded.exported_program is not None:
        found.update(_vocab_from_graph(loaded.exported_program))
    return found


def _vocab_from_graph(ep) -> dict[str, int]:
    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    found: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or "embedding" not in str(node.target) or len(node.args) < 2:
            continue
        weight, src = node.args[0], node.args[1]
        while getattr(src, "op", None) == "call_function" and any(f".{v}." in f".{src.target}." or str(src.target).endswith(v) for v in VIEW_OPS):
            src = src.args[0]
        val = getattr(weight, "meta", {}).get("val")
        if getattr(src, "name", None) in user and val is not None and val.dim() == 2:
            found.setdefault(src.name, int(val.shape[0]))
    return found


def first_vocab_size(loaded) -> int | None:
    """num_embeddings of the model's first embedding (nn.Embedding, a scripted one, or the
    first aten.embedding of an exported graph)."""
    import torch

    if loaded.exported_program is not None:
        for node in loaded.exported_program.graph.nodes:
            if node.op == "call_function" and "embedding" in str(node.target):
                val = getattr(node.args[0], "meta", {}).get("val")
                if val is not None and val.dim() == 2:
                    return int(val.shape[0])
        return None
    for m in loaded.module.modules():
        if isinstance(m, torch.nn.Embedding):
            return int(m.num_embeddings)
        if getattr(m, "original_name", None) == "Embedding":  # scripted or traced: its weight's rows
            weight = getattr(m, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                return int(weight.shape[0])
            if hasattr(m, "num_embeddings"):
                return int(m.num_embeddings)
    if isinstance(loaded.module, torch.jit.ScriptModule):
        return _scripted_graph_vocab(loaded.module)
    return None


def _scripted_graph_vocab(module) -> int | None:
    """Rows of the first ``aten::embedding`` weight that is a constant of a TorchScript graph
    (a frozen module keeps no submodules, only its graph)."""
    import torch

    try:
        graph = module.inlined_graph
    except (AttributeError, RuntimeError):
        return None
    for node in graph.findAllNodes("aten::embedding"):
        weight = next(iter(node.inputs()), None)
        if weight is not None and weight.node().kind() == "prim::Constant":
            value = weight.toIValue()
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                return int(value.shape[0])
    return None


def resolve_ranges(loaded, specs, required: bool = True) -> list:
    """``specs`` with the range each integer input draws from filled in and checked.
    ``required`` False: an input with no range and no embedding found keeps no range."""
    traced = traced_vocab_sizes(loaded, specs)
    first = None
    out = []
    for s in specs:
        if s.is_float or s.dtype == "bool":
            out.append(s)
            continue
        vocab = traced.get(s.name)
        if vocab is None and looks_like_token_ids(s.name):
            first = first if first is not None else first_vocab_size(loaded)
            vocab = first
        if s.low is None:
            if is_mask(s.name) or is_position(s.name):
                out.append(s)
                continue
            if vocab is None and not required:
                out.append(s)
                continue
            if vocab is None:
                raise NormexportError(
                    f"integer input '{s.name}' has no range, and normexport finds no embedding it indexes",
                    f"give its range: --input {s.name}:{s.dtype}:{'x'.join(map(str, s.shape))}:LOW,HIGH",
                )
            s = replace(s, low=0.0, high=float(vocab))
        elif vocab is not None and (s.low < 0 or s.high > vocab):
            raise NormexportError(
                f"input '{s.name}' draws ids from [{s.low:g}, {s.high:g}), beyond the {vocab} rows of the embedding it indexes",
                f"give a range within 0,{vocab}: --input {s.name}:{s.dtype}:{'x'.join(map(str, s.shape))}:0,{vocab}",
            )
        out.append(s)
    return out


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BOILERPLATE = ("Traceback", "File ", "Next steps", "- ", "## ", "(Refer to", "Failed to ", "This is step")


def first_cause(e: BaseException, limit: int = 300) -> str:
    """The first line of the innermost exception that says something (torch.onnx wraps the
    real cause in a paragraph of generic advice), without terminal colour codes."""
    chain = []
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for exc in reversed(chain):
        line = _first_real_line(str(exc))
        if line:
            return line[:limit]
    return type(e).__name__


def _first_real_line(text: str) -> str:
    text = ANSI.sub("", text)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(BOILERPLATE):
            return re.sub(r"^<class '([\w.]+)'>:\s*", r"\1: ", line)
    return ""
