"""The options of each stage: what loading, export, fusion, validation and timing each take.
``ConvertOptions`` groups them for the whole chain; ``validate`` and ``bench`` take their own.

Each options object checks its values when it is made (a ``NormexportError`` naming the
option): the command line and the Python API build the same objects, so both refuse the same
values. The command line's option types take their ranges and choices from here.

A stage's target or backend is given by name (or as its record) and resolved here, once, into
its registry record (``FuseOptions.record``, ``ValidateOptions.record``, ``BenchOptions.record``):
an unknown name is the user's error when the options are made, and the stages read the record.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from normexport.errors import NormexportError
from normexport.fuse.registry import DEFAULT_TARGET, TARGETS, Target, target_record
from normexport.inputs import InputSpec
from normexport.runners import BACKENDS, DEFAULT_BACKEND, RESIDUAL_CHOICES, Backend, backend_record

DTYPES = ("float32", "float16", "bfloat16")
EXPORTERS = ("auto", "dynamo", "torchscript")
OPSET = (7, 25)
SEED = (0, 2**32 - 1)
THREADS = (1, 4096)
SAMPLES = (1, 100)
WARMUP = (0, 10000)
ITERS = (1, 100000)


def check_int(name: str, value, bounds: tuple[int, int], optional: bool = False):
    """An integer (not a bool) within ``bounds``, or None where ``optional``."""
    if value is None and optional:
        return None
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise NormexportError(f"{name}={value!r}: must be an integer from {lo} to {hi}", f"give {name} an integer in {lo}..{hi}")
    return value


def check_choice(name: str, value, choices, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        raise NormexportError(f"{name}={value!r}: must be one of {', '.join(choices)}", f"give {name} one of {', '.join(choices)}")
    return value


def check_flag(name: str, value, optional: bool = False):
    if (value is None and optional) or isinstance(value, bool):
        return value
    raise NormexportError(f"{name}={value!r}: must be True or False{' (or None)' if optional else ''}", f"give {name} a bool")


def check_tolerance_value(name: str, value, shown=None) -> float:
    """One tolerance: a finite number >= 0."""
    shown = value if shown is None else shown
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NormexportError(f"{name} {shown!r} is not a number", f"e.g. {name} 1e-4")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise NormexportError(f"{name} {shown}: a tolerance must be finite and >= 0", f"e.g. {name} 1e-4")
    return v


def check_tolerance(name: str, value):
    """None, one tolerance, or {output name: tolerance} with the default under None."""
    if value is None:
        return None
    if isinstance(value, dict):
        for key, v in value.items():
            if key is not None and (not isinstance(key, str) or not key):
                raise NormexportError(f"{name}: the output name {key!r} is not a non-empty string", f"give {name} as {{'output name': value}} (the default under None)")
            check_tolerance_value(name if key is None else f"{name} for {key!r}", v)
        return value
    return check_tolerance_value(name, value)


def check_backend(value) -> Backend:
    """A backend's name (or its record) as its record."""
    return value if isinstance(value, Backend) else backend_record(check_choice("backend", value, BACKENDS))


def check_path(name: str, value, optional: bool = True):
    if value is None and optional:
        return None
    if isinstance(value, (str, os.PathLike)) and str(value) != "":
        return value
    raise NormexportError(f"{name}={value!r}: must be a path (str or os.PathLike)", f"give {name} the path to write")
from normexport.quant_check import Thresholds
from normexport.quantize import QuantizeOptions


@dataclass
class LoadOptions:
    inputs: list[InputSpec] = field(default_factory=list)  # bound to the model's inputs by name
    factory: str | None = None
    trust_pickle: bool = False
    dtype: str | None = None  # convert the model and its float inputs first

    def __post_init__(self):
        if not isinstance(self.inputs, (list, tuple)) or not all(isinstance(i, InputSpec) for i in self.inputs):
            raise NormexportError(f"inputs={self.inputs!r}: must be a list of InputSpec", "parse each with normexport.inputs.parse_input_spec")
        if self.factory is not None and not isinstance(self.factory, str):
            raise NormexportError(f"factory={self.factory!r}: must be 'MODULE:FUNCTION'", "e.g. factory='models.zoo:llama'")
        check_flag("trust_pickle", self.trust_pickle)
        check_choice("dtype", self.dtype, DTYPES, optional=True)


@dataclass
class ExportOptions:
    opset: int | None = None
    exporter: str = "auto"
    seed: int = 0  # of the example inputs the export traces

    def __post_init__(self):
        check_int("opset", self.opset, OPSET, optional=True)
        check_choice("exporter", self.exporter, EXPORTERS)
        check_int("seed", self.seed, SEED)


@dataclass
class FuseOptions:
    target: str = DEFAULT_TARGET
    residual: str | bool = "auto"  # fold residual Adds into the fused op where one feeds a norm: on, off, auto (the backend's record says)
    record: Target = field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.target, (str, Target)):
            raise NormexportError(f"target={self.target!r}: must be a target's name", f"e.g. target='{DEFAULT_TARGET}' (one of {', '.join(TARGETS)})")
        self.record = target_record(self.target)  # an unknown target: the user's error
        self.target = self.record.name
        if not isinstance(self.residual, bool):
            check_choice("residual", self.residual, RESIDUAL_CHOICES)


@dataclass
class ValidateOptions:
    backend: str = DEFAULT_BACKEND
    atol: float | dict | None = None  # one value, or by output name with the default under None
    rtol: float | dict | None = None
    samples: int = 2
    seed: int = 0
    threads: int | None = None
    dtype: str | None = None  # the model's dtype (TensorRT's precision; stress default)
    localize: bool = True
    stress: bool | None = None  # each fused norm alone on large rows; None: on for fp16/bf16 norms
    quant_thresholds: Thresholds = field(default_factory=Thresholds)  # a quantized model's pass/fail (None fields: the kind's defaults)
    record: Backend = field(init=False, repr=False)

    def __post_init__(self):
        self.record = check_backend(self.backend)
        self.backend = self.record.name
        check_tolerance("atol", self.atol)
        check_tolerance("rtol", self.rtol)
        check_int("samples", self.samples, SAMPLES)
        check_int("seed", self.seed, SEED)
        check_int("threads", self.threads, THREADS, optional=True)
        check_choice("dtype", self.dtype, DTYPES, optional=True)
        check_flag("localize", self.localize)
        check_flag("stress", self.stress, optional=True)


@dataclass
class BenchOptions:
    backend: str = DEFAULT_BACKEND
    warmup: int = 5
    iters: int = 30
    threads: int | None = None
    seed: int = 0
    dtype: str | None = None
    record: Backend = field(init=False, repr=False)

    def __post_init__(self):
        self.record = check_backend(self.backend)
        self.backend = self.record.name
        check_int("warmup", self.warmup, WARMUP)
        check_int("iters", self.iters, ITERS)
        check_int("threads", self.threads, THREADS, optional=True)
        check_int("seed", self.seed, SEED)
        check_choice("dtype", self.dtype, DTYPES, optional=True)


@dataclass
class ConvertOptions:
    """The whole chain. ``validate`` / ``bench`` None: that stage is skipped."""

    load: LoadOptions = field(default_factory=LoadOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
    fuse: FuseOptions = field(default_factory=FuseOptions)
    validate: ValidateOptions | None = field(default_factory=ValidateOptions)
    bench: BenchOptions | None = field(default_factory=BenchOptions)
    quantize: QuantizeOptions | None = None  # weight-only quantization after the fusion
    output: Path | None = None
    keep_failed: bool = False

    def __post_init__(self):
        for name, value, kind in (("load", self.load, LoadOptions), ("export", self.export, ExportOptions), ("fuse", self.fuse, FuseOptions)):
            if not isinstance(value, kind):
                raise NormexportError(f"{name}={value!r}: must be a {kind.__name__}", f"build it with normexport.options.{kind.__name__}")
        for name, value, kind in (("validate", self.validate, ValidateOptions), ("bench", self.bench, BenchOptions)):
            if value is not None and not isinstance(value, kind):
                raise NormexportError(f"{name}={value!r}: must be a {kind.__name__} or None", f"build it with normexport.options.{kind.__name__}")
        check_path("output", self.output)
        check_flag("keep_failed", self.keep_failed)

    @property
    def backend(self) -> Backend:
        """The backend the converted model is meant for: validation's, else the bench's, else the default."""
        stage = self.validate or self.bench
        return stage.record if stage is not None else backend_record(DEFAULT_BACKEND)
