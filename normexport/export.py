"""torch.onnx export: the dynamo exporter for nn.Modules and ExportedPrograms, the TorchScript
exporter for ScriptModules (the only path that takes them). Batch and sequence dims are made
dynamic where the model allows; where it does not, the export is static and says so."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from normexport.errors import NormexportError
from normexport.inputs import first_cause
from normexport.load import LoadedModel

TORCHSCRIPT_MAX_OPSET = 20
DEFAULT_OPSET = 20


@dataclass
class ExportResult:
    model: ir.Model
    exporter: str  # "dynamo" | "torchscript"
    opset: int
    dynamic: bool
    output_names: list[str]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


EXPORTERS = ("auto", "dynamo", "torchscript")


def export_onnx(loaded: LoadedModel, inputs: dict, opset: int | None = None, workdir: Path | None = None, exporter: str = "auto") -> ExportResult:
    """Export ``loaded`` with example ``inputs`` (name -> tensor) and return the ONNX model.

    ``exporter``: "auto" takes the dynamo exporter, except for ScriptModules, which only the
    TorchScript exporter takes; "torchscript" forces that one for an nn.Module too."""
    import time

    import torch

    start = time.perf_counter()
    opset = opset or DEFAULT_OPSET
    names = list(inputs)
    args = tuple(inputs.values())
    notes: list[str] = []
    is_script = isinstance(loaded.module, torch.jit.ScriptModule)
    if exporter not in EXPORTERS:
        raise NormexportError(f"unknown exporter '{exporter}'", f"one of {', '.join(EXPORTERS)}")
    if is_script and exporter == "dynamo":
        raise NormexportError("the dynamo exporter does not take TorchScript modules", "use --exporter torchscript (or auto)")
    if loaded.exported_program is not None and exporter == "torchscript":
        raise NormexportError("the TorchScript exporter does not take torch.export archives", "use --exporter dynamo (or auto)")
    tmp = Path(tempfile.mkdtemp(prefix="normexport-export-", dir=workdir))  # after the checks: an early error leaves none
    path = tmp / "model.onnx"
    try:
        if is_script or exporter == "torchscript":
            if opset > TORCHSCRIPT_MAX_OPSET:
                raise NormexportError(
                    f"a TorchScript model exports through torch's TorchScript exporter, which stops at opset {TORCHSCRIPT_MAX_OPSET}",
                    f"use --opset {TORCHSCRIPT_MAX_OPSET} or lower (--target onnx raises the opset after export)",
                )
            _check_positional_prefix(loaded, names)
            with _rms_norm_symbolic():
                dynamic = _export_torchscript(loaded.module, args, names, path, opset)
            exporter = "torchscript"
        else:
            exporter = "dynamo"
            dynamic = _export_dynamo(loaded, args, names, path, opset, notes)
        model = ir.load(str(path))
        # External data: load it into memory now, the temp folder goes away.
        for v in model.graph.initializers.values():
            if v.const_value is not None and isinstance(v.const_value, ir.ExternalTensor):
                v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    if model.opset_imports.get("", opset) != opset:
        notes.append(f"the exporter wrote opset {model.opset_imports.get('')} (asked {opset})")
    _name_outputs(model, output_names_of(loaded, inputs), notes)
    outs = [o.name for o in model.graph.outputs]
    return ExportResult(model, exporter, model.opset_imports.get("", opset), dynamic, outs, time.perf_counter() - start, notes)


def output_names_of(loaded: LoadedModel, inputs: dict) -> list[str] | None:
    """The model's own names for its outputs, where it gives them: the keys of a dict (or a
    transformers ModelOutput) of tensors, a NamedTuple's fields. None for a bare tensor or a
    plain tuple (the exporter's names stay). Read from a torch.export archive's output spec,
    else from one forward on the example inputs."""
    import torch

    ep = loaded.exported_program
    if ep is not None:
        spec = ep.call_spec.out_spec
        children = (spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs) if spec is not None else []
        if spec is not None and spec.type is dict and all(c.num_children == 0 for c in children):
            return [str(k) for k in spec.context]
        return None
    from normexport.inputs import call_module
    from normexport.load import _forward_arg_names

    try:
        with torch.inference_mode():
            out = call_module(loaded.module, inputs, positional=not _forward_arg_names(loaded.module))
    except Exception:
        return None  # the export has run this forward already: its error is reported there
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # transformers' ModelOutput: its set fields
        return [str(k) for k in out.keys()] if all(isinstance(v, torch.Tensor) for v in out.values()) else None
    if isinstance(out, dict):
        return [str(k) for k in out] if all(isinstance(v, torch.Tensor) for v in out.values()) else None
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return list(out._fields) if all(isinstance(v, torch.Tensor) for v in out) else None
    return None


def _name_outputs(model: ir.Model, names: list[str] | None, notes: list[str]) -> None:
    """Rename the graph's outputs to the model's own names (where they are as many, distinct,
    and free in the graph)."""
    outputs = list(model.graph.outputs)
    if not names or len(names) != len(outputs) or [o.name for o in outputs] == names:
        return
    taken = {v.name for n in model.graph for v in (*n.inputs, *n.outputs) if v is not None} | {v.name for v in model.graph.inputs}
    taken |= set(model.graph.initializers)
    clash = [n for n, o in zip(names, outputs) if n in taken and n != o.name]
    if len(set(names)) != len(names) or clash:
        notes.append(f"outputs keep the exporter's names: the model's own ({', '.join(names)}) clash with values in the graph")
        return
    for o, n in zip(outputs, names):
        o.name = n


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings; the report says what matters."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            warnings.simplefilter("ignore")
            yield err
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export_dynamo(loaded: LoadedModel, args, names, path: Path, opset: int, notes: list[str]) -> bool:
    """Inputs go to forward() as keywords, so each ONNX input carries the name of the
    parameter it feeds (a forward(*args) takes them in the given order)."""
    import torch

    from normexport.load import dynamic_dims

    common = dict(opset_version=opset, dynamo=True, optimize=True, external_data=True)
    if loaded.exported_program is not None:
        ep = loaded.exported_program
        with _quiet() as err:
            try:
                torch.onnx.export(ep, (), str(path), **common)
            except Exception as e:
                _raise_export_error("torch.onnx could not export the ExportedProgram", e, err, "try another --opset")
        dynamic = any(not isinstance(d, int) for n in ep.graph.nodes if n.op == "placeholder" and "val" in n.meta and hasattr(n.meta["val"], "shape") for d in n.meta["val"].shape)
        return dynamic
    module = loaded.module
    if loaded.input_names:
        call = dict(args=(), kwargs=dict(zip(names, args)))
    else:
        call = dict(args=args, input_names=names)
    shapes = {n: dynamic_dims(a) for n, a in zip(names, args)}
    if not loaded.input_names:
        shapes = tuple(shapes.values())
    with _quiet() as err:
        try:
            torch.onnx.export(module, f=str(path), dynamic_shapes=shapes, **call, **common)
            return True
        except Exception as first:
            notes.append(f"dynamic batch/sequence export failed ({first_cause(first, 240)}); exported with static shapes")
            try:
                torch.onnx.export(module, f=str(path), **call, **common)
                return False
            except Exception as e:
                _raise_export_error("torch.onnx could not export the model", e, err, "check the --input shapes and dtypes, or try another --opset")


def _export_torchscript(module, args, names, path: Path, opset: int) -> bool:
    import torch

    from normexport.runners.torch_runner import flatten_outputs

    with torch.inference_mode():
        outs = flatten_outputs(module(*args))
    out_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    dyn = {n: {i: f"{n}_dim{i}" for i in range(min(2, a.dim()))} for n, a in zip(names, args) if a.dim() > 0}
    dyn.update({n: {i: f"{n}_dim{i}" for i in range(min(2, o.dim()))} for n, o in zip(out_names, outs) if o.dim() > 0})
    with _quiet() as err:
        try:
            torch.onnx.export(module, args, str(path), input_names=names, output_names=out_names, dynamic_axes=dyn, opset_version=opset, dynamo=False)
            return True
        except Exception as e:
            _raise_export_error(
                "torch's TorchScript exporter could not export the model", e, err, "check the --input shapes and dtypes, or save the model as a state_dict and use --factory"
            )


def _check_positional_prefix(loaded: LoadedModel, names: list[str]) -> None:
    """The TorchScript exporter passes inputs by position: they must be the signature's first ones."""
    if loaded.input_names and names != loaded.input_names[: len(names)]:
        gap = next(n for n in loaded.input_names if n not in names)
        raise NormexportError(
            f"the TorchScript exporter passes inputs by position, and {loaded.signature_text()} takes '{gap}' before {', '.join(n for n in names if loaded.input_names.index(n) > loaded.input_names.index(gap))}",
            f"give --input {gap}:... too, or export with --exporter dynamo (by name)",
        )


def _raise_export_error(what: str, e: Exception, captured, hint: str):
    """One line with the exporter's own first cause; the whole log (what the exporter printed
    and the traceback) goes to a file in the temp folder that the hint names."""
    import os
    import traceback

    fd, log = tempfile.mkstemp(prefix="normexport-export-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(captured.getvalue() if captured is not None else "")
        f.write("\n" + "".join(traceback.format_exception(e)))
    cause = first_cause(e, 240)
    if "No ONNX function found" in cause:
        hint = "torch.onnx has no translation for an operator the model calls: pick another implementation of it in the model (e.g. its config), or register one with torch.onnx.export's custom_translation_table"
    raise NormexportError(f"{what}: {cause}", f"{hint} (full exporter log: {log})") from e


_RMS_NORM_REGISTERED = False


@contextlib.contextmanager
def _rms_norm_symbolic():
    """torch's TorchScript exporter has no aten::rms_norm (torch.nn.RMSNorm, F.rms_norm):
    emit its decomposed chain (computed in fp32), which the fusion then turns into one node.
    Registered once and left registered: it only adds an op torch lacks, and torch 2.13's
    unregister_custom_op_symbolic leaves an empty entry that breaks the next export."""
    global _RMS_NORM_REGISTERED
    import torch
    from torch.onnx import symbolic_helper as sh

    def rms_norm(g, x, normalized_shape, weight, eps):
        shape = sh._get_const(normalized_shape, "is", "normalized_shape")
        eps_value = sh._get_const(eps, "f", "eps") if not sh._is_none(eps) else None
        if eps_value is None:
            eps_value = float(torch.finfo(torch.float32).eps)  # torch's default for fp32
        axes = list(range(-len(shape), 0))
        h = g.op("Cast", x, to_i=1)
        sq = g.op("Mul", h, h)
        opset = sh.GLOBALS.export_onnx_opset_version
        if opset >= 18:
            mean = g.op("ReduceMean", sq, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.int64)), keepdims_i=1)
        else:
            mean = g.op("ReduceMean", sq, axes_i=axes, keepdims_i=1)
        var = g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32)))
        y = g.op("Div", h, g.op("Sqrt", var))
        dtype = x.type().scalarType() if x.type().scalarType() else "Float"
        onnx_dtype = {"Float": 1, "Half": 10, "BFloat16": 16, "Double": 11}.get(dtype, 1)
        y = g.op("Cast", y, to_i=onnx_dtype)
        if not sh._is_none(weight):
            y = g.op("Mul", y, weight)
        return y

    if not _RMS_NORM_REGISTERED:
        for opset in range(9, TORCHSCRIPT_MAX_OPSET + 1):
            torch.onnx.register_custom_op_symbolic("aten::rms_norm", rms_norm, opset)
        _RMS_NORM_REGISTERED = True
    yield
