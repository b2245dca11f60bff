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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from normexport.errors import NormexportError, first_line
from normexport.factory import call_factory  # noqa: F401 (load.call_factory is public)
from normexport.paths import check_member_sizes, require_regular_file, require_usable_path  # noqa: F401 (the file gates, used by load and its callers)
from normexport.inputs import DTYPES, INPUT_SYNTAX, InputSpec, make_inputs, parse_input_spec, spec_of, torch_dtype  # noqa: F401 (the API load.py has always had)

METADATA_NAME = "normexport.json"  # extra file in our TorchScript archives / key in checkpoints

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
        """Bind the user's --input list to the model's inputs by name. A spec that gives no
        range keeps the example's range for that input (only its shape or dtype changes);
        inputs the user does not name keep the example's spec."""
        if not specs:
            return self
        seen: set[str] = set()
        for s in specs:
            if s.name in seen:
                raise NormexportError(f"--input '{s.name}' is given twice", f"give each input once; the model takes {self.signature_text()}")
            seen.add(s.name)
            if self.input_names and s.name not in self.input_names:
                raise NormexportError(f"--input names '{s.name}', which is not an input of the model: {self.signature_text()}", f"use one of: {', '.join(self.input_names)}")
        merged = {e.name: e for e in self.input_specs or []}
        for s in specs:
            old = merged.get(s.name)
            if s.low is None and old is not None and old.low is not None and old.is_float == s.is_float and s.dtype != "bool":
                s = replace(s, low=old.low, high=old.high)
            merged[s.name] = s
        self.input_specs = list(merged.values())
        return self

    def signature_text(self) -> str:
        required = set(self.required_names())
        parts = [n if n in required else f"{n}=..." for n in self.input_names]
        return f"forward({', '.join(parts)})" if self.input_names else "forward(*args) (inputs bound in the order given)"

    def required_names(self) -> list[str]:
        if self.kind == "export":
            return list(self.input_names)
        return _forward_arg_names(self.module, required_only=True)

    def require_specs(self, ranges: bool = True) -> list[InputSpec]:
        """The inputs to draw, in the order of the model's signature, every name checked
        against it, every required input present, integer ranges resolved (normexport.inputs).
        ``ranges`` False (nothing is compared or timed): an integer input whose range cannot be
        found is left without one (the export feeds it id 0), not refused."""
        if not self.input_specs:
            names = ", ".join(self.input_names) or "NAME"
            raise NormexportError(
                f"no example inputs are known for {self.path or 'the model'} (inputs: {names})",
                f"give them with {INPUT_SYNTAX}",
            )
        by_name = {}
        for s in self.input_specs:
            if s.name in by_name:
                raise NormexportError(f"input '{s.name}' is described twice", f"give each input once; the model takes {self.signature_text()}")
            by_name[s.name] = s.checked(f"input '{s.name}'")
        unknown = [n for n in by_name if self.input_names and n not in self.input_names]
        if unknown:
            raise NormexportError(
                f"example input(s) {', '.join(unknown)} are not inputs of the model: {self.signature_text()}",
                f"name the inputs after forward()'s parameters ({INPUT_SYNTAX})",
            )
        missing = [n for n in self.required_names() if n not in by_name]
        if missing:
            raise NormexportError(f"no --input given for model input(s) {', '.join(missing)} of {self.signature_text()}", f"add {INPUT_SYNTAX}")
        order = self.input_names or list(by_name)
        specs = [by_name[n] for n in order if n in by_name]
        from normexport.inputs import resolve_ranges

        self.input_specs = resolve_ranges(self, specs, required=ranges)
        return self.input_specs


# ---------------------------------------------------------------------------------------------
# Detection


def detect_kind(path: Path) -> str:
    """Tell the model kind from the file's bytes. Raises NormexportError for anything else."""
    from normexport.hf import is_hf_folder

    if is_hf_folder(path):  # before the file gate: a folder with config.json is a Hugging Face model
        raise NormexportError(f"{path} is a Hugging Face folder; this command takes a model file", "`normexport convert` takes the folder itself")
    path = require_regular_file(path)
    if path.stat().st_size == 0:
        raise NormexportError(f"{path} is empty (0 bytes), not a model", "pass the model file itself (was it copied or downloaded in full?)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                check_member_sizes(path, z.infolist())
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
    if factory is not None and kind in ("torchscript", "export"):
        what = "a TorchScript archive" if kind == "torchscript" else "a torch.export archive"
        raise NormexportError(f"{path} is {what}, which holds its own module; --factory is only for state_dicts", "drop --factory")
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
        cause = f"archive member '{foreign[0]}' references {foreign[1]}, which is not a TorchScript type" if foreign else first_line(e)
        raise NormexportError(
            f"{path}: TorchScript archive fails to load ({cause})",
            "re-save it with torch.jit.save (TorchScript archives never run Python pickles; --trust-pickle does not change that)",
        ) from None
    module.eval()
    names = _forward_arg_names(module)
    specs = None
    if extra[METADATA_NAME]:
        meta = _metadata_json(extra[METADATA_NAME], path)
        if not isinstance(meta, dict):
            raise NormexportError(f"{path}: its normexport input metadata is a JSON {type(meta).__name__}, not an object with an inputs list", f"re-save the model, or give every input with {INPUT_SYNTAX}")
        specs = _metadata_specs(meta, path) or None
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
        raise NormexportError(f"{path}: torch.export archive fails to load ({first_line(e)})", "re-save it with torch.export.save") from None
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


def _load_pickle(path: Path, factory: str | None, trust_pickle: bool) -> LoadedModel:
    import pickle

    import torch

    from normexport.pt2 import unpickling_reason

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        safe = True
    except pickle.UnpicklingError as e:
        reason = unpickling_reason(e)
        if not trust_pickle:
            raise NormexportError(
                f"{path}: refusing to unpickle it, it needs code to load ({reason})",
                "unpickling runs code from the file; only if you trust it, pass --trust-pickle (or save a state_dict and use --factory)",
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e2:
            raise NormexportError(f"{path}: trusted pickle fails to load ({first_line(e2)})", "is the module's class importable from here?") from None
        safe = False
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise NormexportError(f"{path}: corrupt or truncated torch.save file ({first_line(e)})", "re-save or re-download the model file") from None

    meta = _checkpoint_metadata(obj, path)
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


def _metadata_json(text, path) -> object:
    """The input metadata normexport stores in its own files, parsed; broken metadata is the file's fault."""
    try:
        return json.loads(text)
    except (ValueError, TypeError) as e:
        raise NormexportError(f"{path}: its normexport input metadata is not valid JSON ({e})", "re-save the model, or give every input with --input") from None


def _checkpoint_metadata(obj, path=None) -> dict | None:
    if isinstance(obj, dict):
        meta = obj.get(METADATA_NAME) or obj.get("normexport")
        if isinstance(meta, str):
            meta = _metadata_json(meta, path)
        if isinstance(meta, dict) and "inputs" in meta:
            _metadata_specs(meta, path)
            return meta
        ex = obj.get("example_inputs")
        if isinstance(ex, dict) and ex:
            return {"inputs": [s.to_json() for s in _example_specs(ex, path)]}
    return None


def _metadata_specs(meta: dict, path) -> list[InputSpec]:
    """The input specs of normexport's metadata: a list of objects, each checked."""
    inputs = meta.get("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(d, dict) for d in inputs):
        raise NormexportError(f"{path}: its normexport input metadata has inputs that are not a list of objects", f"re-save the model, or give every input with {INPUT_SYNTAX}")
    return [InputSpec.from_json(d) for d in inputs]


def _example_specs(example: dict, path) -> list[InputSpec]:
    """Specs of a checkpoint's ``example_inputs``: tensors by input name, nothing else."""
    import torch

    for k, v in example.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise NormexportError(
                f"{path}: its example_inputs entry {str(k)[:60]!r} is a {type(v).__name__}{'' if isinstance(k, str) else ' under a ' + type(k).__name__ + ' key'}, not a tensor by input name",
                f"save example_inputs as {{name: tensor}}, or give every input with {INPUT_SYNTAX}",
            )
    return [spec_of(k, v).checked(f"{path}: example input '{k}'") for k, v in example.items()]


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
            f"{path}: weights do not fit the factory's module ({sizes[0] if sizes else first_line(e)})",
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


def _forward_arg_names(module, required_only: bool = False) -> list[str]:
    """The names ``module.forward`` takes its inputs by, in order (``required_only``: those
    without a default). ``*args`` / ``**kwargs`` are not names an input can be bound to."""
    try:
        schema = module.forward.schema  # ScriptModule
        return [a.name for a in schema.arguments[1:] if not (required_only and a.has_default_value())]
    except AttributeError:
        pass
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in sig.parameters.values() if p.kind in kinds and not (required_only and p.default is not p.empty)]


# ---------------------------------------------------------------------------------------------
# Saving our own archives


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
