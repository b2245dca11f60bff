"""The stages wired together: load -> export -> fuse -> validate -> bench -> report.

``convert`` is the whole chain; ``validate_models`` and ``bench_models`` are the stages the
``validate`` and ``bench`` commands enter on their own (``convert`` calls the same code).
The CLI only parses options, calls one of these and prints the report.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from normexport import outputs
from normexport.errors import NormexportError
from normexport.fuse import FuseReport, fuse_model, load_onnx, save_onnx
from normexport.fuse.report import require_norms  # noqa: F401 (the API refuses through it too)
from normexport.load import InputSpec, LoadedModel, load_model, make_inputs, require_regular_file
from normexport.options import BenchOptions, ConvertOptions, ExportOptions, FuseOptions, LoadOptions, ValidateOptions  # noqa: F401 (the stages' options)
from normexport.runners import DEFAULT_BACKEND, backends_running, residual_layout

DEFAULT_BENCH_THREADS = 1  # PyTorch's and onnxruntime's thread count unless --threads: see docs/BENCHMARKS.md
LARGE_INPUT_SCALE = 300.0  # fp16/bf16 draws whose squares overflow fp16 (300² > 65504)


@dataclass
class ConvertReport:
    model: str
    target: str
    output: str | None
    kind: str = ""
    exporter: str = ""
    opset: int | None = None
    dynamic: bool = False
    inputs: list[dict] = field(default_factory=list)
    fusion: FuseReport | None = None
    validation: object = None  # ValidationReport
    bench: object = None  # BenchReport
    steps: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    written: bool = False
    residual: str = ""  # which residual layout the fusion used, and why
    quantization: object = None  # quantize.QuantizeReport
    quantized_accuracy: object = None  # quant_check.QuantizedAccuracy (the written model against PyTorch)

    def to_json(self) -> dict:
        fusion = self.fusion.to_json() if self.fusion else None
        out = {
            "model": self.model,
            "target": self.target,
            "output": self.output if self.written else None,
            "kind": self.kind,
            "exporter": self.exporter,
            "opset": self.opset,
            "dynamic_shapes": self.dynamic,
            "inputs": self.inputs,
            "fusion": fusion,
            "validation": self.validation.to_json() if self.validation is not None else None,
            "latency_ms": None,
            "bench": None,
            "steps_s": {k: round(v, 3) for k, v in self.steps.items()},
            "residual_layout": self.residual,
            "quantization": self.quantization.to_json() if self.quantization is not None else None,
            "quantized_accuracy": self.quantized_accuracy.to_json() if self.quantized_accuracy is not None else None,
            "notes": self.notes,
        }
        if self.bench is not None:
            b = self.bench.to_json()
            out["bench"] = b
            out["latency_ms"] = b["latency_ms"]
        return out


Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def default_output(model: Path, target: str) -> Path:
    model = Path(model)
    if model.name in ("", ".", ".."):
        model = Path(os.path.abspath(model))
    return model.with_name(f"{model.stem or 'model'}.{target}.onnx")


def prepare_model(path: Path, opts: LoadOptions, ranges: bool = True) -> tuple[LoadedModel, list[InputSpec]]:
    """Load, apply --input and --dtype; the specs the rest of the run draws inputs from
    (``ranges`` False: nothing is compared or timed, so no integer input needs a range)."""
    loaded = load_model(path, factory=opts.factory, trust_pickle=opts.trust_pickle).with_inputs(opts.inputs or None)
    specs = loaded.require_specs(ranges)
    if opts.dtype:
        specs = apply_dtype(loaded, specs, opts.dtype)
    return loaded, specs


def apply_dtype(loaded: LoadedModel, specs: list[InputSpec], dtype: str) -> list[InputSpec]:
    import torch

    if dtype not in ("float16", "bfloat16", "float32"):
        raise NormexportError(f"unknown --dtype '{dtype}'", "one of float32, float16, bfloat16")
    if loaded.exported_program is not None:
        raise NormexportError("--dtype cannot convert a torch.export archive (its graph is fixed)", "export it in that dtype, or give a state_dict with --factory")
    loaded.module.to(getattr(torch, dtype))
    return [InputSpec(s.name, dtype, s.shape, s.low, s.high) if s.is_float else s for s in specs]


def convert(path: str | os.PathLike, opts: ConvertOptions, progress: Progress = _noop) -> ConvertReport:
    """Convert the model file (or Hugging Face folder) at ``path``: load, then ``convert_loaded``."""
    path = Path(path)
    from normexport.hf import route_folder

    if route_folder(path):  # a Hugging Face folder: a KV-cache decoder folder, checked by generation
        from normexport.hf.convert import convert_folder

        return convert_folder(path, opts, progress=progress)
    out = Path(opts.output) if opts.output else default_output(path, opts.fuse.target)
    outputs.check_distinct([path], [outputs.Output("-o", out, "onnx")])
    check_runnable(opts)
    from normexport.quantize import check_quantize

    check_quantize(opts)
    t = time.perf_counter()
    progress(f"loading {path}")
    loaded, specs = prepare_model(path, opts.load, ranges=opts.validate is not None or opts.bench is not None)
    report = ConvertReport(model=str(path), target=opts.fuse.target, output=str(out), kind=loaded.kind)
    report.steps["load"] = time.perf_counter() - t
    return convert_loaded(loaded, specs, out, opts, report, progress)


def check_runnable(opts: ConvertOptions) -> None:
    """A target no backend runs is the user's error (exit 2) where a stage needs one to run it:
    validation, the bench, or --residual-fusion auto (which asks the backend)."""
    if opts.validate or opts.bench or opts.fuse.residual == "auto":
        backends_running(opts.fuse.record)


def _runs_on(target) -> str:
    return ", ".join(b.name for b in backends_running(target))


def convert_loaded(loaded: LoadedModel, specs: list[InputSpec], out: Path, opts: ConvertOptions, report: ConvertReport, progress: Progress = _noop) -> ConvertReport:
    """Export, fuse, validate and time a loaded model; install the fused model at ``out``
    (through normexport.outputs) when it validates, or with ``opts.keep_failed``."""
    from normexport.norm_modules import refuse_without_rmsnorm

    report.notes += loaded.notes
    report.inputs = [s.to_json() for s in specs]
    target = opts.fuse.record
    check_runnable(opts)
    refuse_without_rmsnorm(loaded.module, report.model, loaded.path, opts.load.factory)  # before any export
    with outputs.work_dir() as workdir:
        unfused_path, fused_path = _export_and_fuse(loaded, specs, workdir, out.name, opts, report, progress)
        fp32_path = fused_path
        if opts.quantize:
            fused_path = _quantize_file(fp32_path, workdir / "quantized" / out.name, opts, report, progress)
        v, b = opts.validate, opts.bench
        if v and not v.record.runs(target):
            report.notes.append(f"not validated: {target.name} nodes run only on --backend {_runs_on(target)} (on a machine that has it)")
        elif v:
            t = time.perf_counter()
            progress(f"validating against PyTorch ({v.samples} sample(s))")
            report.validation = validate_models(loaded, specs, unfused_path, fp32_path, v)
            report.steps["validate"] = time.perf_counter() - t
            if opts.quantize:
                t = time.perf_counter()
                progress("measuring the quantized model against PyTorch")
                report.quantized_accuracy = check_quantized_file(loaded, specs, fused_path, v, opts.quantize.kind)
                report.steps["validate_quantized"] = time.perf_counter() - t
                if not report.quantized_accuracy.passed:
                    report.validation.passed = False
                    report.validation.notes.append("the float graph matches; the quantized model misses its thresholds: " + "; ".join(report.quantized_accuracy.failures))
        if b and not b.record.runs(target):
            report.notes.append(f"not benchmarked: {target.name} nodes run only on --backend {_runs_on(target)}")
        elif b:
            t = time.perf_counter()
            progress(f"benchmarking ({b.iters} runs each)")
            feeds = [make_inputs(specs, b.seed + 1000 + i) for i in range(3)]
            report.bench = bench_models(loaded, unfused_path, fused_path, feeds, b)
            report.steps["bench"] = time.perf_counter() - t
        passed = report.validation is None or report.validation.passed
        if passed or opts.keep_failed:
            outputs.install_onnx(fused_path, out)
            report.written = True
        else:
            report.notes.append(f"validation failed: {out} not written (--keep-failed writes it anyway)")
    return report


def _no_norm_hint(loaded: LoadedModel, opts: ConvertOptions) -> str:
    """Where the model has LayerNorms, how to convert it; else how to see what normexport sees."""
    from normexport.norm_modules import layer_norm_paths, ln2rms_hint

    if loaded.exported_program is None and layer_norm_paths(loaded.module):
        return ln2rms_hint(loaded.path, opts.load.factory)
    return "run `normexport inspect` to see what it sees"


def _export_and_fuse(loaded, specs, workdir: Path, name: str, opts: ConvertOptions, report: ConvertReport, progress: Progress) -> tuple[Path, Path]:
    """The unfused export and the fused model, both written into ``workdir``."""
    from normexport.export import export_onnx

    t = time.perf_counter()
    progress("exporting with torch.onnx")
    exp = export_onnx(loaded, make_inputs(specs, opts.export.seed, unranged_zeros=True), opts.export.opset, exporter=opts.export.exporter)
    report.exporter, report.opset, report.dynamic = exp.exporter, exp.opset, exp.dynamic
    report.notes += exp.notes
    unfused_path = workdir / "unfused.onnx"
    save_onnx(exp.model, unfused_path)
    report.steps["export"] = time.perf_counter() - t

    t = time.perf_counter()
    progress(f"fusing RMSNorm for target {opts.fuse.target}")
    model = load_onnx(unfused_path)
    fold, report.residual = residual_layout(opts.fuse.residual, opts.backend, opts.fuse.record)
    report.fusion = fuse_model(model, opts.fuse.record, residual=fold)
    require_norms(report.fusion, report.model, _no_norm_hint(loaded, opts))
    fused_path = workdir / "fused" / name  # named as the output: its external data file too
    save_onnx(model, fused_path)
    report.steps["fuse"] = time.perf_counter() - t
    return unfused_path, fused_path


def _quantize_file(src: Path, dst: Path, opts: ConvertOptions, report: ConvertReport, progress: Progress) -> Path:
    from normexport.quantize import quantize_model

    t = time.perf_counter()
    progress(f"quantizing the weight MatMuls to {opts.quantize.kind} (onnxruntime's MatMulNBitsQuantizer)")
    quantized, report.quantization = quantize_model(load_onnx(src), opts.quantize)
    save_onnx(quantized, dst)
    report.steps["quantize"] = time.perf_counter() - t
    return dst


def check_quantized_file(loaded: LoadedModel, specs: list[InputSpec], quantized: Path, opts: ValidateOptions, kind: str):
    """The quantized model's outputs against PyTorch's on ``opts.samples`` seeded draws, row by
    row along the last axis (quant_check), and its fused norms alone (stress check)."""
    from normexport.quant_check import QuantizedAccuracy, check_quantized_outputs
    from normexport.runners import TorchRunner, make_onnx_runner
    from normexport.runners.torch_runner import to_numpy
    from normexport.stress import stress_check

    result = QuantizedAccuracy(opts.quant_thresholds.resolved(kind))
    with make_onnx_runner(quantized, opts.record, optimize=True, threads=opts.threads) as runner:
        with TorchRunner(loaded.module, [s.name for s in specs], runner.output_names, threads=opts.threads) as torch_runner:
            for i in range(opts.samples):
                feed = {k: to_numpy(v) for k, v in make_inputs(specs, opts.seed + i).items()}
                check_quantized_outputs(torch_runner.infer(feed), runner.infer(feed), result)
    result.notes.append(f"{opts.samples} seeded draws; each output's rows along its last axis compared as logits")
    result.stress = stress_check(quantized, None, opts, opts.seed)
    return result


# ---------------------------------------------------------------------------------------------
# Validate


def validate_models(loaded: LoadedModel, specs: list[InputSpec], unfused: Path | None, fused: Path, opts: ValidateOptions):
    """PyTorch vs the unfused export (when given) vs the fused model, on ``opts.samples``
    seeded draws (plus large-magnitude draws for fp16/bf16 inputs), with onnxruntime's graph
    optimizations off so that its own fusions cannot hide or fake ours."""
    from normexport.runners import TorchRunner, make_onnx_runner
    from normexport.runners.torch_runner import to_numpy
    from normexport.validate import ValidationReport, compare_outputs, keep_worst

    draws = [(opts.seed + i, 1.0) for i in range(opts.samples)]
    if any(s.dtype in ("float16", "bfloat16") for s in specs):
        draws.append((opts.seed + opts.samples, LARGE_INPUT_SCALE))
    fused_acc, unfused_acc, cross_acc = {}, {}, {}
    feeds = []
    with contextlib.ExitStack() as stack:
        fused_runner = stack.enter_context(make_onnx_runner(fused, opts.record, optimize=False, threads=opts.threads, dtype=opts.dtype))
        unfused_runner = stack.enter_context(make_onnx_runner(unfused, DEFAULT_BACKEND, optimize=False, threads=opts.threads)) if unfused else None
        torch_runner = stack.enter_context(TorchRunner(loaded.module, [s.name for s in specs], fused_runner.output_names, threads=opts.threads))
        for i, (seed, scale) in enumerate(draws):
            feed = {k: to_numpy(v) for k, v in make_inputs(specs, seed, scale).items()}
            feeds.append(feed)
            ref = torch_runner.infer(feed)
            got = fused_runner.infer(feed)
            keep_worst(fused_acc, compare_outputs(ref, got, opts.atol, opts.rtol, sample=i))
            if unfused_runner is not None:
                base = unfused_runner.infer(feed)
                keep_worst(unfused_acc, compare_outputs(ref, base, opts.atol, opts.rtol, sample=i, sides=("PyTorch", "unfused ONNX")))
                keep_worst(cross_acc, compare_outputs(base, got, opts.atol, opts.rtol, sample=i, sides=("unfused ONNX", "fused ONNX")))
    outputs = list(fused_acc.values())
    report = ValidationReport(
        passed=bool(outputs) and all(c.passed for c in outputs),  # no outputs compared is no agreement
        samples=len(draws),
        outputs=outputs,
        unfused=list(unfused_acc.values()),
        fused_vs_unfused=list(cross_acc.values()),
        backend=opts.backend,
    )
    if len(draws) > opts.samples:
        report.notes.append(f"sample {opts.samples} draws float inputs at scale {LARGE_INPUT_SCALE:g} (fp16 squares overflow there)")
    if unfused_acc and not all(c.passed for c in unfused_acc.values()):
        report.notes.append("the unfused export already differs from PyTorch: the exporter, not the fusion, is off")
    if not report.passed and opts.localize:
        from normexport.localize import localize

        worst = report.worst
        feed = feeds[worst.sample] if worst is not None and worst.sample < len(feeds) else feeds[0]
        try:
            report.norms, report.first_divergence = localize(loaded, [s.name for s in specs], fused, feed, opts)
        except NormexportError as e:
            report.notes.append(f"could not localise the divergence: {e.message}")
    from normexport.stress import stress_check, wanted

    if wanted(opts.stress, opts.dtype, fused):
        report.stress = stress_check(fused, unfused, opts, opts.seed)
        report.passed = report.passed and report.stress.passed
    return report


# ---------------------------------------------------------------------------------------------
# Bench


def bench_models(loaded: LoadedModel | None, unfused: Path | None, fused: Path, feeds: list[dict], opts: BenchOptions):
    """Latency of the variants side by side (interleaved rounds), and the normalization share."""
    from normexport.bench import BenchReport, feeds_numpy, interleaved, norm_share, ort_norm_ops, unfused_norm_node_names
    from normexport.fuse.registry import RESIDUAL_OPS
    from normexport.runners import TorchRunner, make_onnx_runner

    threads = opts.threads or DEFAULT_BENCH_THREADS
    np_feeds = feeds_numpy(feeds)
    report = BenchReport(threads=threads, warmup=opts.warmup, iters=opts.iters, input_sets=len(feeds))
    if not opts.threads:
        report.notes.append(f"{threads} thread(s) for PyTorch and onnxruntime by default: the steadiest timings on a shared machine (--threads N for more)")
    backend = opts.record
    runners = {}
    if loaded is not None:
        runners["torch"] = TorchRunner(loaded.module, list(feeds[0]), threads=threads)
    if unfused is not None:
        runners["onnx_unfused"] = make_onnx_runner(unfused, backend, optimize=True, threads=threads, dtype=opts.dtype)
    runners["onnx_fused"] = make_onnx_runner(fused, backend, optimize=True, threads=threads, dtype=opts.dtype)
    entered = []
    try:
        for r in runners.values():
            r.__enter__()
            entered.append(r)
        report.latency_ms = interleaved(runners, np_feeds, opts.warmup, opts.iters)
    finally:
        for r in entered:
            r.__exit__(None, None, None)
    if backend.onnxruntime:  # onnxruntime's profiler measures the norm share
        prof_iters = max(5, min(opts.iters, 20))
        if unfused is not None:
            report.norm_share["onnx_unfused"] = norm_share(unfused, np_feeds, threads, prof_iters, unfused_norm_node_names(unfused), backend=backend)
            if backend.cpu:
                own = ort_norm_ops(unfused, backend)
                if own:
                    report.notes.append(
                        "onnxruntime's own optimizer already fuses norms of the unfused model ("
                        + ", ".join(f"{n}x {op}" for op, n in own.items())
                        + "): the unfused baseline runs fused norms too"
                    )
        report.norm_share["onnx_fused"] = norm_share(fused, np_feeds, threads, prof_iters, backend=backend)
        ratio = report.ratio("onnx_fused", "onnx_unfused")
        folded = sorted(RESIDUAL_OPS & set(ort_norm_ops(fused, backend)))
        if not backend.fold_residual and ratio is not None and ratio > 1.0 and folded:
            report.notes.append(f"{', '.join(folded)} on {backend.name}: {backend.residual_why}; convert with --residual-fusion auto (or off)")
    report.notes.append("onnxruntime with its default graph optimizations (as deployed); PyTorch eager in inference_mode")
    return report


def prepare_model_for(path: Path, onnx_path: Path, opts: LoadOptions) -> tuple[LoadedModel, list[InputSpec]]:
    """For validate / bench on a given ONNX file: a clear error for a missing or corrupt ONNX
    file before PyTorch loads anything, then the model, then inputs that cover the ONNX's."""
    require_regular_file(onnx_path, "ONNX")
    load_onnx(onnx_path)
    loaded, specs = prepare_model(path, opts)
    check_inputs_cover(onnx_path, specs)
    return loaded, specs


def bench_onnx(loaded: LoadedModel, specs: list[InputSpec], fused: Path, unfused: Path | None, opts: BenchOptions):
    """``bench_models`` on a given fused ONNX file; without ``unfused``, the unfused model is
    exported from ``loaded`` into a private temp folder first."""
    feeds = [make_inputs(specs, opts.seed + 1000 + i) for i in range(3)]
    with outputs.work_dir("normexport-bench-") as tmp:
        if unfused is None:
            from normexport.export import export_onnx

            unfused = tmp / "unfused.onnx"
            save_onnx(export_onnx(loaded, feeds[0]).model, unfused)
        return bench_models(loaded, unfused, fused, feeds, opts)


def onnx_inputs(model_path: Path) -> list[tuple[str, str | None, list[int | None] | None]]:
    """The ONNX model's graph inputs (initializers aside): name, dtype name (None: not stated)
    and dims (None for a dim without a fixed size; None for all: no shape stated)."""
    import onnx

    m = onnx.load_model(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    found = []
    for i in m.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        if not t.elem_type:
            dtype = None
        elif t.elem_type == onnx.TensorProto.BFLOAT16:
            dtype = "bfloat16"
        else:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim] if t.HasField("shape") else None
        found.append((i.name, dtype, dims))
    return found


def check_inputs_cover(model_path: Path, specs: list[InputSpec]) -> None:
    """The ONNX model's inputs must all have a spec of its dtype and of its static dims
    (validate/bench on a given ONNX file)."""
    graph_inputs = onnx_inputs(model_path)
    by_name = {s.name: s for s in specs}
    missing = [name for name, _, _ in graph_inputs if name not in by_name]
    if missing:
        raise NormexportError(f"{model_path} takes input(s) {', '.join(missing)} that have no spec", "name them as the ONNX model does with --input NAME:DTYPE:SHAPE")
    for name, dtype, dims in graph_inputs:
        s = by_name[name]
        fits = dims is None or (len(dims) == len(s.shape) and all(d is None or d == n for d, n in zip(dims, s.shape)))
        if dtype != s.dtype or not fits:
            want = "x".join("?" if d is None else str(d) for d in dims) if dims is not None else "any shape"
            raise NormexportError(
                f"input '{name}' is {s.dtype}:{'x'.join(map(str, s.shape))} here, but {model_path} takes {dtype}:{want}",
                "give --input shapes and dtypes that match the ONNX model (or the ONNX model of this MODEL)",
            )
