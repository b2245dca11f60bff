"""The options of each stage: what loading, export, fusion, validation and timing each take.
``ConvertOptions`` groups them for the whole chain; ``validate`` and ``bench`` take their own.

A stage's target or backend is given by name and resolved here, once, into its registry record
(``FuseOptions.record``, ``ValidateOptions.record``, ``BenchOptions.record``): an unknown name is
the user's error when the options are made, and the stages read the record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from normexport.fuse.registry import DEFAULT_TARGET, Target, target_record
from normexport.inputs import InputSpec
from normexport.runners import DEFAULT_BACKEND, Backend, backend_record


@dataclass
class LoadOptions:
    inputs: list[InputSpec] = field(default_factory=list)  # bound to the model's inputs by name
    factory: str | None = None
    trust_pickle: bool = False
    dtype: str | None = None  # convert the model and its float inputs first


@dataclass
class ExportOptions:
    opset: int | None = None
    exporter: str = "auto"
    seed: int = 0  # of the example inputs the export traces


@dataclass
class FuseOptions:
    target: str = DEFAULT_TARGET
    residual: str | bool = "auto"  # fold residual Adds into the fused op where one feeds a norm: on, off, auto (the backend's record says)
    record: Target = field(init=False, repr=False)

    def __post_init__(self):
        self.record = target_record(self.target)
        self.target = self.record.name


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
    record: Backend = field(init=False, repr=False)

    def __post_init__(self):
        self.record = backend_record(self.backend)
        self.backend = self.record.name


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
        self.record = backend_record(self.backend)
        self.backend = self.record.name


@dataclass
class ConvertOptions:
    """The whole chain. ``validate`` / ``bench`` None: that stage is skipped."""

    load: LoadOptions = field(default_factory=LoadOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
    fuse: FuseOptions = field(default_factory=FuseOptions)
    validate: ValidateOptions | None = field(default_factory=ValidateOptions)
    bench: BenchOptions | None = field(default_factory=BenchOptions)
    output: Path | None = None
    keep_failed: bool = False

    @property
    def backend(self) -> Backend:
        """The backend the converted model is meant for: validation's, else the bench's, else the default."""
        stage = self.validate or self.bench
        return stage.record if stage is not None else backend_record(DEFAULT_BACKEND)
