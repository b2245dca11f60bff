"""Detect and load the model kinds normexport accepts, and describe their inputs.

Kinds are told apart by content, never by extension:
- TorchScript archive (``torch.jit.save``): a zip with ``code/`` and ``constants.pkl``;
- torch.export archive (``torch.export.save``): a zip with ``archive_format`` / ``models/``;
- ``torch.save`` pickle: a state_dict or checkpoint dict (needs ``--factory``), or a whole
  pickled module (needs ``--trust-pickle``: unpickling it runs code).
Nothing is unpickled with arbitrary globals unless the user said ``--trust-pickle``: pickles
load with ``weights_only=True`` and .pt2 archives through ``normexport.pt2``. Only regular
files are read (``require_regular_file``).
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normexport.errors import NormexportError
from normexport.factory import call_factory  # noqa: F401 (load.call_factory is public)

METADATA_NAME = "normexport.json"  # extra file in our TorchScript archives / key in checkpoints

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
        return cls(d["name"], DTYPES[d["dtype"]], tuple(int(s) for s in d["shape"]), d.get("low"), d.get("high"))

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float32", "float16", "bfloat16")


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``NAME:DTYPE:SHAPE[:LOW,HIGH]``; raise NormexportError with the syntax on any flaw."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[0]:
        raise NormexportError(f"malformed --input '{text}'", f"use {INPUT_SYNTAX}")
    name, dtype, shape_text = parts[0], parts[1].lower(), parts[2]
    if dtype not in DTYPES:
        raise NormexportError(
            f"unknown dtype '{parts[1]}' in --input '{text}'", f"one of {', '.join(sorted(set(DTYPES.values())))}"
        )
    if not re.fullmatch(r"\d+(x\d+)*", shape_text):
        raise NormexportError(f"malformed shape '{shape_text}' in --input '{text}'", "dims as positive integers joined by 'x', e.g. 1x16")
    shape = tuple(int(s) for s in shape_text.split("x"))
    if any(s <= 0 for s in shape):
        raise NormexportError(f"shape '{shape_text}' in --input '{text}' has a zero dim", "every dim must be >= 1")
    low = high = None
    if len(parts) == 4:
        m = re.fullmatch(r"(-?[\d.e+-]+),(-?[\d.e+-]+)", parts[3])
        if not m:
            raise NormexportError(f"malformed range '{parts[3]}' in --input '{text}'", "give LOW,HIGH, e.g. 0,128")
        low, high = float(m.group(1)), float(m.group(2))
        if not low < high:
            raise NormexportError(f"empty range '{parts[3]}' in --input '{text}'", "LOW must be below HIGH")
    return InputSpec(name, DTYPES[dtype], shape, low, high)


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def spec_of(name: str, tensor) -> InputSpec:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in DTYPES.values():
        raise NormexportError(f"input '{name}' has unsupported dtype {dtype}", f"supported: {', '.join(sorted(set(DTYPES.values())))}")
    import torch

    low = high = None
    if not tensor.dtype.is_floating_point and tensor.dtype != torch.bool and tensor.numel():
        # Integer inputs are indices (token ids): never draw beyond what the example used.
        low, high = 0.0, float(int(tensor.max()) + 1)
    return InputSpec(name, dtype, tuple(tensor.shape), low, high)


@dataclass
class LoadedModel:
    """A PyTorch model ready to run and export, with what is known about its inputs."""

    module: Any  # nn.Module or ScriptModule (ExportedProgram.module() for .pt2)
    kind: str  # "torchscript" | "export" | "state_dict" | "pickle"
    path: Path | None
    input_names: list[str]
    input_specs: list[InputSpec] | None = None  # None: unknown, needs --input
    exported_program: Any = None  # torch.export.ExportedProgram for .pt2
    notes: list[str] = field(default_factory=list)

    def with_inputs(self, specs: list[InputSpec] | None) -> LoadedModel:
        """Override (all) input specs with the user's --input list, checking names."""
        if not specs:
            return self
        known = set(self.input_names)
        for s in specs:
            if known and s.name not in known:
                raise NormexportError(
                    f"--input names '{s.name}', but the model's inputs are {', '.join(self.input_names)}",
                    f"use one of: {', '.join(self.input_names)}",
                )
        self.input_specs = list(specs)
        if not self.input_names:
            self.input_names = [s.name for s in specs]
        return self

    def require_specs(self) -> list[InputSpec]:
        if not self.input_specs:
            names = ", ".join(self.input_names) or "NAME"
            raise NormexportError(
                f"no example inputs are known for {self.path or 'the model'} (inputs: {names})",
                f"give them with {INPUT_SYNTAX}",
            )
        missing = [n for n in self.input_names if n not in {s.name for s in self.input_specs}]
        if missing and self.kind != "export":
            raise NormexportError(f"no --input given for model input(s) {', '.join(missing)}", f"add {INPUT_SYNTAX}")
        return self.input_specs


# ---------------------------------------------------------------------------------------------
# Detection


def require_regular_file(path: str | os.PathLike, what: str = "MODEL") -> Path:
    """The one gate every input file passes before it is opened: it must exist and be a
    regular file (after symlinks). A FIFO, device, socket or directory is refused from its
    ``os.stat`` alone, never opened (a FIFO blocks, /dev/zero never ends)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NormexportError(f"{path}: no such file", "check the path") from None
    except OSError as e:
        raise NormexportError(f"{path}: cannot read it ({e.strerror})", "check the path and its permissions") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise NormexportError(f"{path} is a directory, not a file", f"pass the {what} file itself")
    kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
    raise NormexportError(f"{path} is {kind}, not a regular file", f"pass the {what} as a regular file (copy it into one)")


def detect_kind(path: Path) -> str:
    """Tell the model kind from the file's bytes. Raises NormexportError for anything else."""
    from normexport.hf import is_hf_folder

    if is_hf_folder(path):  # before the file gate: a folder with config.json is a Hugging Face model
        raise NormexportError(f"{path} is a Hugging Face folder; this command takes a model file", "`normexport convert` takes the folder itself")
    path = require_regular_file(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                bad = z.testzip() if path.stat().st_size < (64 << 20) else None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise NormexportError(f"{path}: corrupt or truncated archive ({e})", "re-save or re-download the model file") from None
        if bad is not None:
            raise NormexportError(f"{path}: corrupt archive (member {bad} fails its checksum)", "re-save or re-download the model file")
        if any(n.endswith("/archive_format") for n in names) or any("/models/" in n and n.endswith(".json") for n in names):
            return "export"
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") for n in names):
            return "pickle"
        raise NormexportError(f"{path}: a zip archive, but not one PyTorch wrote", "pass a file written by torch.save, torch.jit.save or torch.export.save")
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "pickle"  # legacy (non-zip) torch.save format
    if _looks_like_onnx(path):
        raise NormexportError(f"{path} is an ONNX model, not a PyTorch one", "use `normexport fuse` on ONNX files")
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        raise NormexportError(f"{path} is a text file, not a model", "pass a file written by torch.save, torch.jit.save or torch.export.save")
    raise NormexportError(f"{path}: not a PyTorch model file (unrecognised content)", "pass a file written by torch.save, torch.jit.save or torch.export.save")


def _looks_like_onnx(path: Path) -> bool:
    if path.stat().st_size > (1 << 31):
        return False
    try:
        import onnx

        m = onnx.load_model(str(path), load_external_data=False)
        return len(m.graph.node) > 0
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(path: str | os.PathLike, factory: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load MODEL by its content. ``factory`` ("MODULE:FUNCTION") builds the module for a state_dict."""
    path = Path(path)
    kind = detect_kind(path)
    if kind == "torchscript":
        return _load_torchscript(path)
    if kind == "export":
        return _load_exported(path, trust_pickle)
    return _load_pickle(path, factory, trust_pickle)


def _load_torchscript(path: Path) -> LoadedModel:
    import torch

    extra = {METADATA_NAME: ""}
    data = path.read_bytes()
    try:
        # TorchScript's unpickler builds TorchScript types only: it never imports Python.
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except Exception as e:
        foreign = _foreign_pickle_global(data)
        cause = f"archive member '{foreign[0]}' references {foreign[1]}, which is not a TorchScript type" if foreign else _first_line(e)
        raise NormexportError(
            f"{path}: TorchScript archive fails to load ({cause})",
            "re-save it with torch.jit.save (TorchScript archives never run Python pickles; --trust-pickle does not change that)",
        ) from None
    module.eval()
    names = _forward_arg_names(module)
    specs = None
    if extra[METADATA_NAME]:
        meta = json.loads(extra[METADATA_NAME])
        specs = [InputSpec.from_json(d) for d in meta.get("inputs", [])] or None
    return LoadedModel(module, "torchscript", path, names, specs)


def _load_exported(path: Path, trust_pickle: bool = False) -> LoadedModel:
    import torch

    from normexport import pt2

    data = path.read_bytes()  # one read: the bytes checked are the bytes loaded
    notes = []
    try:
        try:
            ep = pt2.load_exported(data)
        except pt2.UnsafeMember as e:
            if not trust_pickle:
                raise NormexportError(f"{path}: refusing to load it: {e}", pt2.TRUST_HINT) from None
            ep = pt2.load_exported(data, trusted=True)
            notes.append(f"loaded with --trust-pickle ({e})")
    except NormexportError:
        raise
    except Exception as e:
        raise NormexportError(f"{path}: torch.export archive fails to load ({_first_line(e)})", "re-save it with torch.export.save") from None
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    specs = None
    if ep.example_inputs is not None:
        args, kwargs = ep.example_inputs
        tensors = list(args) + [kwargs[k] for k in kwargs]
        orig_names = _signature_names_from_ep(ep) or names
        if all(isinstance(t, torch.Tensor) for t in tensors) and len(tensors) == len(orig_names):
            specs = [spec_of(n, t) for n, t in zip(orig_names, tensors)]
            names = orig_names
    module = ep.module()
    return LoadedModel(module, "export", path, names, specs, exported_program=ep, notes=notes)


def _foreign_pickle_global(data: bytes) -> tuple[str, str] | None:
    """The first pickle member of a TorchScript zip that names a Python global outside torch."""
    import pickletools

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                if not info.filename.endswith((".pkl", ".debug_pkl")) or info.file_size > (64 << 20):
                    continue
                strings: list[str] = []
                for op, arg, _ in pickletools.genops(z.read(info)):
                    if isinstance(arg, str):
                        strings.append(arg)
                    name = arg.replace(" ", ".") if op.name == "GLOBAL" else ".".join(strings[-2:]) if op.name == "STACK_GLOBAL" else None
                    if name and not name.startswith(("__torch__.", "torch.", "collections.OrderedDict")):
                        return info.filename.split("/", 1)[-1], name
    except Exception:
        return None
    return None


def _signature_names_from_ep(ep) -> list[str] | None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = ep.call_spec.in_spec  # ((args...), {kwargs})
            n_args = spec.children_specs[0].num_children if spec is not None else None
            kw = spec.children_specs[1].context if spec is not None else []
        user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        if n_args is not None and n_args + len(kw) == len(user):
            return user[:n_args] + list(kw)
    except Exception:
        return None
    return None


_UNSAFE_MARKERS = ("Unsupported global", "Unsupported operand", "Weights only load failed")


def _load_pickle(path: Path, factory: str | None, trust_pickle: bool) -> LoadedModel:
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        safe = True
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if not trust_pickle:
            raise NormexportError(
                f"{path}: refusing to unpickle it, it needs code to load ({reason})",
                "unpickling runs code from the file; only if you trust it, pass --trust-pickle (or save a state_dict and use --factory)",
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e2:
            raise NormexportError(f"{path}: trusted pickle fails to load ({_first_line(e2)})", "is the module's class importable from here?") from None
        safe = False
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise NormexportError(f"{path}: corrupt or truncated torch.save file ({_first_line(e)})", "re-save or re-download the model file") from None

    meta = _checkpoint_metadata(obj)
    if isinstance(obj, torch.nn.Module):
        module, kind = obj, "pickle"
    elif isinstance(obj, dict) and isinstance(obj.get("model"), torch.nn.Module):
        module, kind = obj["model"], "pickle"
    else:
        state = _find_state_dict(obj)
        if state is None:
            raise NormexportError(f"{path}: holds a {type(obj).__name__}, neither a module nor a state_dict", "save model.state_dict() or the module itself")
        if factory is None:
            raise NormexportError(f"{path} is a state_dict: normexport needs code to build the module", "name a function that builds it: --factory MODULE:FUNCTION")
        module, example = call_factory(factory)
        _load_state(module, state, path)
        kind = "state_dict"
        if example is not None and meta is None:
            meta = {"inputs": [spec_of(k, v).to_json() for k, v in example.items()]}
    if factory is not None and kind == "pickle":
        raise NormexportError(f"{path} holds a whole module; --factory is only for state_dicts", "drop --factory")
    module.eval()
    names = _forward_arg_names(module)
    specs = [InputSpec.from_json(d) for d in meta["inputs"]] if meta else None
    notes = [] if safe else ["loaded with --trust-pickle (code in the file was executed)"]
    return LoadedModel(module, kind, path, names, specs, notes=notes)


def _unpickling_reason(e: Exception) -> str:
    text = str(e)
    for line in text.splitlines():
        line = line.strip()
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", line)
        if m:
            return f"it references {m.group(1)}"
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:", 1)[-1].strip()
    return "it holds objects other than tensors"


def _checkpoint_metadata(obj) -> dict | None:
    if isinstance(obj, dict):
        meta = obj.get(METADATA_NAME) or obj.get("normexport")
        if isinstance(meta, str):
            meta = json.loads(meta)
        if isinstance(meta, dict) and "inputs" in meta:
            return meta
        ex = obj.get("example_inputs")
        if isinstance(ex, dict) and ex:
            return {"inputs": [spec_of(k, v).to_json() for k, v in ex.items()]}
    return None


def _find_state_dict(obj):
    import torch

    def is_state(d):
        return isinstance(d, dict) and d and all(isinstance(k, str) for k in d) and all(isinstance(v, torch.Tensor) for v in d.values())

    if is_state(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "module", "weights"):
            if is_state(obj.get(key)):
                return obj[key]
    return None


def _load_state(module, state: dict, path: Path) -> None:
    result = None
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        sizes = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise NormexportError(
            f"{path}: weights do not fit the factory's module ({sizes[0] if sizes else _first_line(e)})",
            "does the factory build the same architecture and sizes the weights were saved from?",
        ) from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:3])}")
        raise NormexportError(
            f"{path}: state_dict keys do not match the factory's module: {'; '.join(parts)}",
            "does the factory build the same architecture the weights were saved from?",
        )


def _forward_arg_names(module) -> list[str]:
    try:
        schema = module.forward.schema  # ScriptModule
        return [a.name for a in schema.arguments[1:]]
    except AttributeError:
        pass
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Inputs


def make_inputs(specs: list[InputSpec], seed: int, scale: float = 1.0) -> dict:
    """Seeded random tensors for ``specs``. Floats ~ N(0, scale²) unless a range is given."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in specs:
        dt = torch_dtype(s.dtype)
        if s.dtype == "bool":
            out[s.name] = torch.rand(s.shape, generator=g) < 0.5
        elif s.is_float:
            if s.low is not None:
                t = torch.rand(s.shape, generator=g, dtype=torch.float64) * (s.high - s.low) + s.low
            else:
                t = torch.randn(s.shape, generator=g, dtype=torch.float64) * scale
            out[s.name] = t.to(dt)
        else:
            low = int(s.low) if s.low is not None else 0
            high = int(s.high) if s.high is not None else 2
            out[s.name] = torch.randint(low, high, s.shape, generator=g, dtype=dt)
    return out


# ---------------------------------------------------------------------------------------------
# Saving our own archives


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename into place, so a failure leaves no partial file
    (normexport.outputs: a fresh temp beside ``path``, fsynced, then ``os.replace``)."""
    from normexport import outputs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_with(path, write)


def _write_bytes(path: Path, data: bytes) -> None:
    from normexport import outputs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_bytes(path, data)


def save_torchscript(module, example_inputs: dict, path: Path) -> None:
    """Script (or trace) ``module`` and save it with normexport's input metadata."""
    import torch

    module.eval()
    try:
        scripted = torch.jit.script(module)
    except Exception:
        scripted = torch.jit.trace(module, tuple(example_inputs.values()), strict=False)
    meta = json.dumps({"inputs": [spec_of(k, v).to_json() for k, v in example_inputs.items()]})
    buf = io.BytesIO()  # serialised first: a write error is then Python's OSError (a full disk: exit 2)
    torch.jit.save(scripted, buf, _extra_files={METADATA_NAME: meta})
    _write_bytes(path, buf.getvalue())


def save_exported(module, example_inputs: dict, path: Path, dynamic: bool = True) -> None:
    """torch.export the module (batch/sequence dims dynamic where it allows) and save the archive."""
    _write_bytes(path, exported_bytes(export_program(module, example_inputs, dynamic=dynamic)))


def exported_bytes(ep) -> bytes:
    """The .pt2 archive of ``ep``, without the stack traces (they hold absolute paths: the
    archive would depend on where it was made)."""
    import torch

    for node in ep.graph.nodes:
        node.meta.pop("stack_trace", None)
    buf = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer; the temp file has neither
    torch.export.save(ep, buf)
    return buf.getvalue()


def export_program(module, example_inputs: dict, dynamic: bool = True):
    """torch.export ``module`` (in eval mode), inputs bound to ``forward``'s parameters by name.

    With ``dynamic``, batch (dim 0) and sequence (dim 1) stay dynamic where torch allows: a
    batch of 1 is traced as 2 (torch specialises a dim of size 1). Where that fails, or the
    doubled batch comes out static, the example is exported with static shapes.
    """
    import torch

    module.eval()
    if dynamic:
        inputs = _batch_of_two(example_inputs)
        args, kwargs = bind_inputs(module, inputs)
        dims = {k: dynamic_dims(v) if isinstance(v, torch.Tensor) else None for k, v in inputs.items()}
        shapes = {k: dims[k] for k in kwargs} if kwargs else tuple(dims[k] for k in bound_names(module, inputs)[0])
        try:
            ep = torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=False)
            if inputs is example_inputs or _batch_is_dynamic(ep):
                return ep
        except Exception:
            pass
    args, kwargs = bind_inputs(module, example_inputs)
    return torch.export.export(module, args, kwargs, strict=False)


def bind_inputs(module, inputs: dict) -> tuple[tuple, dict]:
    """``inputs`` as (args, kwargs) for ``module.forward`` (see ``bound_names``)."""
    positional, keyword = bound_names(module, inputs)
    return tuple(inputs[k] for k in positional), {k: inputs[k] for k in keyword}


def bound_names(module, inputs: dict) -> tuple[list[str], list[str]]:
    """The names of ``inputs`` passed by position and by keyword, in the order torch.export
    and the module take them: the leading parameters of ``forward`` by position, in its order
    (archives stay byte-identical); otherwise every input by keyword; where an input names no
    parameter (a ``forward(*args)``), every input by position in the order given."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    leading = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    order = [n for n in named if n in inputs]
    if len(order) != len(inputs):
        return list(inputs), []
    if order == leading[: len(order)]:
        return order, []
    return [], order


def _batch_of_two(example_inputs: dict) -> dict:
    import torch

    if not any(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1 for v in example_inputs.values()):
        return example_inputs
    return {
        k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1 else v
        for k, v in example_inputs.items()
    }


def _batch_is_dynamic(ep) -> bool:
    import torch

    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"]
    return any(isinstance(v, torch.Tensor) and v.dim() and not isinstance(v.shape[0], int) for v in vals)


def dynamic_dims(tensor) -> dict | None:
    """Batch (dim 0) and sequence (dim 1) marked AUTO: torch keeps them dynamic where it can."""
    from torch.export import Dim

    if tensor.dim() == 0:
        return None
    return {i: Dim.AUTO for i in range(min(2, tensor.dim()))}
