"""The Python API (``normexport.convert``, ``fuse``, ``validate``, ``bench``, ``ln2rms``): the
same pipeline as the command line, for a module in memory or a file, from Python or pytest.

Models are an ``nn.Module`` in memory or a path to a model file normexport loads (TorchScript,
torch.export archive, state_dict with ``factory``, pickled module with ``trust_pickle``).
ONNX models are a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``. Example inputs are a
dict of tensors bound to the model's inputs by name, or a tuple of tensors (or one tensor)
bound to ``forward``'s parameters by position, as ``torch.onnx.export(model, args)`` takes
them: their names, dtypes and shapes describe the seeded random draws that validation and
timing run on (integer inputs that index an embedding draw across its whole vocabulary; other
integer inputs within the example's range). ``validate`` and ``bench`` without inputs draw
from the ONNX model's own input signature where it is complete (every dim fixed, every dtype
stated; integer inputs only where they index an embedding of the module).
A module given is switched to eval mode. Every user error raises a
``normexport.errors.NormexportError`` subclass.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from normexport import outputs, pipeline
from normexport.errors import NormexportError
from normexport.fuse import load_onnx
from normexport.load import InputSpec, LoadedModel, load_model, spec_of
from normexport.fuse.registry import DEFAULT_TARGET
from normexport.runners import DEFAULT_BACKEND
from normexport.options import BenchOptions, ConvertOptions, ExportOptions, FuseOptions, LoadOptions, ValidateOptions, check_flag

PathLike = str | os.PathLike


@dataclass
class ConvertResult:
    """What ``convert`` did: ``output`` is the written fused model (None when validation
    failed and nothing was written), ``report`` the full report."""

    output: Path | None
    report: pipeline.ConvertReport

    @property
    def passed(self) -> bool:
        """Validation passed (True when validation was not run)."""
        return self.report.validation is None or bool(self.report.validation.passed)

    @property
    def fusion(self):
        return self.report.fusion

    @property
    def validation(self):
        return self.report.validation

    @property
    def bench(self):
        return self.report.bench

    def to_json(self) -> dict:
        """The report as the CLI's ``--report`` writes it."""
        return self.report.to_json()


def _is_module(model: Any) -> bool:
    import torch

    return isinstance(model, torch.nn.Module)


def _by_name(loaded: LoadedModel, inputs: Any) -> Mapping[str, Any]:
    """Example inputs by name: a dict as given; a tuple (or one tensor) bound to ``forward``'s
    parameters by position, as torch.onnx.export binds its ``args``."""
    import torch

    if isinstance(inputs, Mapping):
        return inputs
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise NormexportError(f"inputs must be a dict of tensors by input name or a tuple of tensors, got {type(inputs).__name__}",
                              f"e.g. {{'input_ids': ids}} or (ids,); the model takes {loaded.signature_text()}")
    positional = _positional_names(loaded.module)
    if positional is None:
        raise NormexportError("the module's forward takes *args: a tuple of inputs has no names to bind to", "pass a dict {input name: tensor}")
    if len(inputs) > len(positional):
        raise NormexportError(f"{len(inputs)} inputs given by position, but the model takes {loaded.signature_text()}",
                              "give at most one tensor per positional parameter, or a dict by name")
    return dict(zip(positional, inputs))


def _positional_names(module) -> list[str] | None:
    """``forward``'s parameters that take a value by position, in order; None where it takes
    ``*args`` (their names are not known)."""
    import inspect

    from normexport.load import _forward_arg_names

    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return _forward_arg_names(module)  # a ScriptModule: its schema's names, in order
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _specs_from_tensors(loaded: LoadedModel, inputs: Any) -> list[InputSpec]:
    import torch

    inputs = _by_name(loaded, inputs)
    specs = []
    for name, t in inputs.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise NormexportError(f"input {name!r} is a {type(t).__name__}, not a tensor named by a string", "give a dict {input name: torch.Tensor}")
        specs.append(spec_of(name, t))
    return specs


def _widen_to_vocab(loaded: LoadedModel, specs: list[InputSpec]) -> list[InputSpec]:
    """Integer inputs that index an embedding draw over all its rows, not just the example's ids."""
    from normexport.inputs import traced_vocab_sizes

    ints = [s for s in specs if not s.is_float and s.dtype != "bool" and s.low is not None]
    if not ints:
        return specs
    vocab = traced_vocab_sizes(loaded, specs)
    return [replace(s, low=0.0, high=float(vocab[s.name])) if s in ints and s.name in vocab else s for s in specs]


def load(model: Any, inputs: Any = None, *, factory: str | None = None, trust_pickle: bool = False, dtype: str | None = None,
         onnx_path: Path | None = None) -> tuple[LoadedModel, list[InputSpec]]:
    """A module in memory or a model file, with the specs of the inputs to draw: from
    ``inputs`` (a dict by name, or a tuple by position), else for a module in memory from the
    ONNX model at ``onnx_path`` (its input signature)."""
    LoadOptions(factory=factory, trust_pickle=trust_pickle, dtype=dtype)  # the options' own checks
    if _is_module(model):
        from normexport.load import _forward_arg_names

        if factory is not None:
            raise NormexportError("factory= builds the module for a state_dict file; a module in memory needs none", "drop factory=, or pass the state_dict file's path")
        loaded = LoadedModel(model.eval(), "module", None, _forward_arg_names(model))
        if inputs is not None:
            loaded = loaded.with_inputs(_specs_from_tensors(loaded, inputs))
        elif onnx_path is not None:
            loaded = loaded.with_inputs(_specs_from_onnx(loaded, onnx_path))
        else:
            raise NormexportError("a module in memory needs example inputs", "pass a dict of tensors by input name, e.g. {'input_ids': ids}, or a tuple (ids,)")
        given = {s.name for s in loaded.input_specs}
        missing = [n for n in loaded.required_names() if n not in given]
        if missing:
            raise NormexportError(f"the example inputs have no {', '.join(map(repr, missing))} for {loaded.signature_text()}", "give a tensor for every input forward() requires")
        if inputs is not None:
            loaded.input_specs = _widen_to_vocab(loaded, loaded.input_specs)
    elif isinstance(model, (str, os.PathLike)):
        loaded = load_model(Path(model), factory=factory, trust_pickle=trust_pickle)
        if inputs is not None:
            loaded = loaded.with_inputs(_specs_from_tensors(loaded, inputs))
    else:
        raise NormexportError(f"model must be an nn.Module or a path, got {type(model).__name__}", "pass the module itself or the path of a model file")
    specs = loaded.require_specs()
    if dtype:
        specs = pipeline.apply_dtype(loaded, specs, dtype)
    return loaded, specs


def _specs_from_onnx(loaded: LoadedModel, onnx_path: Path) -> list[InputSpec]:
    """The inputs to draw, read off the ONNX model's input signature: every dim fixed and every
    dtype stated, integer inputs drawn across the embedding they index (masks: ones, positions:
    0..T-1). Anything the signature leaves open is the user's to give."""
    from normexport.inputs import DTYPES, is_mask, is_position, traced_vocab_sizes

    hint = "pass example inputs: a dict {input name: tensor} or a tuple of tensors"
    specs = []
    for name, dtype, dims in pipeline.onnx_inputs(onnx_path):
        if dtype not in DTYPES.values():
            raise NormexportError(f"the ONNX model's input '{name}' has {'no stated dtype' if dtype is None else f'dtype {dtype}'}, so its draws are unknown", hint)
        if dims is None or any(d is None for d in dims):
            shape = "no stated shape" if dims is None else "shape " + "x".join("?" if d is None else str(d) for d in dims)
            raise NormexportError(f"the ONNX model's input '{name}' has {shape}: its draws need every dim fixed", hint)
        integer = dtype not in ("float32", "float16", "bfloat16", "bool") and not is_mask(name) and not is_position(name)
        specs.append(InputSpec(name, dtype, tuple(dims), 0.0 if integer else None, 1.0 if integer else None))
    integers = [s.name for s in specs if s.low is not None]
    if integers:
        vocab = traced_vocab_sizes(loaded, specs)
        unknown = [n for n in integers if n not in vocab]
        if unknown:
            raise NormexportError(f"the ONNX model's integer input(s) {', '.join(unknown)} index no embedding of the module: their range is unknown", hint)
        specs = [replace(s, high=float(vocab[s.name])) if s.name in vocab else s for s in specs]
    return specs


@contextlib.contextmanager
def onnx_file(model: Any) -> Iterator[Path]:
    """A path to the ONNX model: the given path, or an in-memory model written to a temp folder."""
    if isinstance(model, (str, os.PathLike)):
        yield pipeline.require_regular_file(model, "ONNX")
        return
    import onnx
    import onnx_ir as ir

    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    if not isinstance(model, ir.Model):
        raise NormexportError(f"an ONNX model must be a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}", "pass the .onnx file's path")
    from normexport.fuse import save_onnx

    with outputs.work_dir() as tmp:
        path = tmp / "model.onnx"
        save_onnx(model, path)
        yield path


def convert(
    model: Any,
    example_inputs: Any = None,
    *,
    output: PathLike | None = None,
    target: str = DEFAULT_TARGET,
    backend: str = DEFAULT_BACKEND,
    residual: str | bool = "auto",
    opset: int | None = None,
    exporter: str = "auto",
    dtype: str | None = None,
    validate: bool = True,
    bench: bool = False,
    atol: float | dict | None = None,
    rtol: float | dict | None = None,
    samples: int = 2,
    seed: int = 0,
    threads: int | None = None,
    keep_failed: bool = False,
    force: bool = False,
    factory: str | None = None,
    trust_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Export ``model`` to ONNX, fuse every RMSNorm for ``target``, validate against PyTorch
    (and time it with ``bench=True``), and write the fused model to ``output`` as
    ``normexport convert`` does: atomically, never over an input or a file normexport did not
    write (unless ``force``), and not at all when validation fails (unless ``keep_failed``).

    ``model``: an ``nn.Module`` (then ``example_inputs``, a dict of tensors by input name or a
    tuple by position, and ``output`` are required) or a model file's path (``output`` defaults to
    ``<name>.<target>.onnx`` beside it). ``atol``/``rtol``: one value, or a dict by ONNX output
    name with the default under None. A Hugging Face folder is converted by the CLI only.
    """
    for name, flag in (("validate", validate), ("bench", bench), ("force", force)):
        check_flag(name, flag)
    opts = ConvertOptions(
        export=ExportOptions(opset=opset, exporter=exporter, seed=seed),
        fuse=FuseOptions(target=target, residual=residual),
        validate=ValidateOptions(backend=backend, atol=atol, rtol=rtol, samples=samples, seed=seed, threads=threads, dtype=dtype) if validate else None,
        bench=BenchOptions(backend=backend, threads=threads, seed=seed, dtype=dtype) if bench else None,
        output=output, keep_failed=keep_failed,
    )
    if _is_module(model):
        if output is None:
            raise NormexportError("convert of a module in memory needs output=", "give the path the fused .onnx model is written to")
        out, source, reads = Path(output), f"{type(model).__name__} (in memory)", []
    else:
        if not isinstance(model, (str, os.PathLike)):
            raise NormexportError(f"model must be an nn.Module or a path, got {type(model).__name__}", "pass the module itself or the path of a model file")
        out = Path(output) if output is not None else pipeline.default_output(Path(model), target)
        source, reads = str(model), [model]
    from normexport.factory import factory_source

    outputs.check([*reads, factory_source(factory)], [outputs.Output("output", out, "onnx")], force)
    loaded, specs = load(model, example_inputs, factory=factory, trust_pickle=trust_pickle, dtype=dtype)
    report = pipeline.ConvertReport(model=source, target=target, output=str(out), kind=loaded.kind)
    report = pipeline.convert_loaded(loaded, specs, out, opts, report, progress or (lambda _: None))
    return ConvertResult(out if report.written else None, report)


def fuse(onnx_model: Any, target: str = DEFAULT_TARGET, *, residual: str | bool = "auto", allow_none: bool = False):
    """Fuse every RMSNorm of an ONNX model for ``target``: returns ``(model, FuseReport)``.

    ``onnx_model``: a path (read and checked as the CLI does; an ``onnx_ir.Model`` comes
    back), an ``onnx.ModelProto`` (a new ``ModelProto`` comes back) or an ``onnx_ir.Model``
    (fused in place and returned). A model with no RMSNorm raises ``NormexportError`` unless
    ``allow_none`` (or the target emits primitive ops only: it takes any model).
    """
    import onnx
    import onnx_ir as ir

    from normexport.fuse import checked_proto, fuse_model, target_record
    from normexport.fuse.registry import fold_residual

    record, fold = target_record(target), fold_residual(residual)
    if isinstance(onnx_model, (str, os.PathLike)):
        model, source, back = load_onnx(pipeline.require_regular_file(onnx_model, "ONNX")), str(onnx_model), None
    elif isinstance(onnx_model, onnx.ModelProto):
        model, source, back = ir.serde.deserialize_model(checked_proto(onnx_model)), "the ONNX model", ir.serde.serialize_model
    elif isinstance(onnx_model, ir.Model):
        model, source, back = onnx_model, "the ONNX model", None
    else:
        raise NormexportError(f"an ONNX model must be a path, onnx.ModelProto or onnx_ir.Model, got {type(onnx_model).__name__}", "pass the .onnx file's path")
    report = fuse_model(model, record, residual=fold)
    if not allow_none and record.ops:
        pipeline.require_norms(report, source, "pass allow_none=True to accept a model without one")
    return (back(model) if back else model), report


def validate(
    model: Any,
    onnx_model: Any,
    inputs: Any = None,
    *,
    atol: float | dict | None = None,
    rtol: float | dict | None = None,
    unfused: Any = None,
    samples: int = 2,
    seed: int = 0,
    backend: str = DEFAULT_BACKEND,
    threads: int | None = None,
    localize: bool = True,
    stress: bool | None = None,
    dtype: str | None = None,
    factory: str | None = None,
    trust_pickle: bool = False,
):
    """Compare the fused ``onnx_model`` with the PyTorch ``model`` output by output on
    ``samples`` seeded draws shaped like ``inputs`` (and the ``unfused`` export, if given);
    where they differ, name the first diverging norm. Returns a ``ValidationReport``
    (``passed``, ``outputs``, ``first_divergence``): a mismatch is a result, not an exception.
    Tolerances default by dtype (normexport.validate.DEFAULT_TOLERANCES)."""
    opts = ValidateOptions(backend=backend, atol=atol, rtol=rtol, samples=samples, seed=seed, threads=threads, localize=localize, stress=stress, dtype=dtype)
    with _model_and_onnx(model, inputs, onnx_model, unfused, factory, trust_pickle, dtype) as (loaded, specs, fused, base):
        return pipeline.validate_models(loaded, specs, base, fused, opts)


@contextlib.contextmanager
def _model_and_onnx(model, inputs, onnx_model, unfused, factory, trust_pickle, dtype):
    """The PyTorch side loaded with its input specs, and the fused (and unfused) ONNX as files
    whose inputs those specs cover: what validate and bench both start from."""
    with onnx_file(onnx_model) as fused, contextlib.ExitStack() as stack:
        base = stack.enter_context(onnx_file(unfused)) if unfused is not None else None
        load_onnx(fused)
        loaded, specs = load(model, inputs, factory=factory, trust_pickle=trust_pickle, dtype=dtype, onnx_path=fused)
        pipeline.check_inputs_cover(fused, specs)
        yield loaded, specs, fused, base


def bench(
    model: Any,
    onnx_model: Any,
    inputs: Any = None,
    *,
    unfused: Any = None,
    backend: str = DEFAULT_BACKEND,
    warmup: int = 5,
    iters: int = 30,
    threads: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
    factory: str | None = None,
    trust_pickle: bool = False,
):
    """Time PyTorch eager, the unfused and the fused ONNX model side by side (the unfused one
    exported from ``model`` unless given) and the normalization share: a ``BenchReport``."""
    opts = BenchOptions(backend=backend, warmup=warmup, iters=iters, threads=threads, seed=seed, dtype=dtype)
    with _model_and_onnx(model, inputs, onnx_model, unfused, factory, trust_pickle, dtype) as (loaded, specs, fused, base):
        return pipeline.bench_onnx(loaded, specs, fused, base, opts)


def ln2rms(module: Any, example_inputs: Any, **kwargs):
    """Convert a Pre-LN transformer into the equivalent Pre-RMSNorm one: ``(module, report)``
    (``example_inputs``: a dict by name or a tuple by position; keywords as
    ``normexport.ln2rms.ln2rms``: ``fold_affine``, ``samples``, ``seed``, ``strict``)."""
    from normexport.ln2rms import ln2rms as convert_ln2rms
    from normexport.load import _forward_arg_names

    if not _is_module(module):
        raise NormexportError(f"expected an nn.Module, got {type(module).__name__}", "pass the module itself")
    loaded = LoadedModel(module, "module", None, _forward_arg_names(module))
    return convert_ln2rms(module, dict(_by_name(loaded, example_inputs)), **kwargs)
