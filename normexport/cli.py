"""The command line: options only; the work is in pipeline.py."""

from __future__ import annotations

import math
import sys
import traceback
from functools import wraps
from pathlib import Path

import click
from rich.markup import escape

from normexport import __version__
from normexport.errors import NormexportError, first_line
from normexport.fuse.registry import TARGETS, targets_help
from normexport.options import DTYPES, EXPORTERS, ITERS, OPSET, SAMPLES, SEED, THREADS, WARMUP
from normexport.hf import route_folder
from normexport.hf.commands import bench_hf, convert_hf, generate_command, hf_bench_options, hf_convert_options, refuse_folder_options, refuse_for_folder, validate_hf
from normexport.runners import BACKENDS, DEFAULT_BACKEND, RESIDUAL_CHOICES, backends_help


USAGE_HINT = "see `{} --help`"


def _report(e: NormexportError, debug: bool) -> None:
    if debug:
        traceback.print_exception(e)
    click.echo(f"error: {_one_line(e.message)}", err=True)
    click.echo(f"hint: {_one_line(e.hint or 'see --help')}", err=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _handle_errors(fn):
    """Exit 2 for the user's errors (one `error:` and one `hint:` line), 3 for normexport's bugs;
    --debug adds the traceback and keeps the code."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from normexport.outputs import install_signal_handlers

        install_signal_handlers()  # SIGTERM cleans up as Ctrl-C does: no temp file stays
        ctx = click.get_current_context()
        debug = (ctx.find_root().params or {}).get("debug", False)
        try:
            result = fn(*args, **kwargs)
        except NormexportError as e:
            _report(e, debug)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            click.echo("interrupted", err=True)
            sys.exit(getattr(e, "exit_code", 130))
        except Exception as e:  # a bug, not the user's doing
            if debug:
                traceback.print_exception(e)
            first = _one_line(first_line(e, 300))
            click.echo(f"internal error: {type(e).__name__}: {first}", err=True)
            click.echo("hint: rerun with --debug for the traceback, and report it", err=True)
            sys.exit(3)
        code = exit_code(result)
        if code:
            sys.exit(code)

    return wrapper


def exit_code(result) -> int:
    """What a command's result means for the exit status: 1 where validation ran and failed
    (a convert report's, a validate command's report, or an HF folder's), else 0. Errors map
    in ``_handle_errors``: the user's 2, interrupts 130, normexport's own bugs 3."""
    validation = getattr(result, "validation", result)
    passed = getattr(validation, "passed", None)
    return 1 if passed is False else 0


class NormexportGroup(click.Group):
    """Click's own usage errors (unknown option, missing argument, bad value) and errors in
    option callbacks get the same two lines and exit 2 as every other user error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # `normexport` alone asks for the help
            click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
            sys.exit(0)
        except click.UsageError as e:
            path = e.ctx.command_path if e.ctx is not None else (prog_name or "normexport")
            _report(NormexportError(e.format_message(), USAGE_HINT.format(path)), False)
            sys.exit(2)
        except click.ClickException as e:
            _report(NormexportError(e.format_message(), "see --help"), False)
            sys.exit(2)
        except NormexportError as e:
            _report(e, "--debug" in argv)
            sys.exit(2)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _parse_inputs(ctx, param, values):
    from normexport.load import parse_input_spec

    return [parse_input_spec(v) for v in values]


def _parse_tolerances(ctx, param, values):
    """``--atol VALUE`` and ``--atol OUTPUT=VALUE`` (repeatable): None, or {None: default, name: value}."""
    from normexport.options import check_tolerance_value

    if not values:
        return None
    out: dict = {}
    for text in values:
        name, _, value = text.rpartition("=") if "=" in text else (None, "", text)
        if name == "":
            raise NormexportError(f"--{param.name} '{text}' has an empty output name", f"use --{param.name} VALUE or --{param.name} OUTPUT=VALUE")
        try:
            v = float(value)
        except ValueError:
            raise NormexportError(f"--{param.name} '{text}' is not a number", f"use --{param.name} VALUE or --{param.name} OUTPUT=VALUE, e.g. 1e-4") from None
        check_tolerance_value(f"--{param.name}", v, shown=text)
        key = name or None
        if key in out:
            raise NormexportError(f"--{param.name} for {'the default' if key is None else repr(key)} is given twice", "give each once")
        out[key] = v
    return out


def model_options(fn):
    """Loading and input options shared by convert / validate / bench."""
    for deco in reversed(
        [
            click.option("--input", "inputs", multiple=True, callback=_parse_inputs, metavar="NAME:DTYPE:SHAPE[:LOW,HIGH]", help="A model input, e.g. input_ids:int64:1x16 (repeatable). Defaults come from the model file or the factory."),
            click.option("--factory", metavar="MODULE:FUNCTION", help="For a state_dict: a function that builds the nn.Module (optionally returning (module, example_inputs))."),
            click.option("--trust-pickle", is_flag=True, help="Allow unpickling a whole pickled module, or .pt2 members that need more than tensors. Unpickling runs code from the file: only for files you trust."),
            click.option("--dtype", type=click.Choice(DTYPES), help="Convert the model and its float inputs to this dtype first (norms still compute in fp32)."),
            click.option("--seed", type=click.IntRange(*SEED), default=0, show_default=True, help="Seed of the random inputs (0 .. 2**32-1)."),
            click.option("--threads", type=click.IntRange(*THREADS), help="Threads for PyTorch and onnxruntime (default: 1 when timing, the steadiest numbers on a busy machine; the runtimes' own count when validating)."),
        ]
    ):
        fn = deco(fn)
    return fn


def residual_options(auto_means: str):
    """``--residual-fusion [auto|on|off]`` (bare: on) and ``--no-residual-fusion`` (= off), as one ``residual`` argument."""

    def decorate(fn):
        @wraps(fn)
        def merged(*args, residual, no_residual, **kw):
            if no_residual and residual not in ("auto", "off"):
                raise click.UsageError(f"--no-residual-fusion contradicts --residual-fusion {residual}")
            return fn(*args, residual="off" if no_residual else residual, **kw)

        merged = click.option("--no-residual-fusion", "no_residual", is_flag=True, help="Same as --residual-fusion off.")(merged)
        return click.option(
            "--residual-fusion", "residual", type=click.Choice(RESIDUAL_CHOICES), default="auto", show_default=True, is_flag=False, flag_value="on",
            help=f"Fold a residual Add that feeds a norm into the fused op (bare flag: on). auto: {auto_means}",
        )(merged)

    return decorate


def quantize_options(fn):
    """--quantize and its settings as one ``quantize`` argument (QuantizeOptions or None)."""
    from normexport.quantize import ACCURACY_LEVELS, BLOCK_SIZES, DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, KINDS, QuantizeOptions

    @wraps(fn)
    def merged(*args, quantize, quant_block_size, quant_accuracy_level, quantize_lm_head, quantize_embeddings, **kw):
        given = [flag for flag, value, default in (
            ("--quant-block-size", quant_block_size, DEFAULT_BLOCK_SIZE), ("--quant-accuracy-level", quant_accuracy_level, DEFAULT_ACCURACY_LEVEL),
            ("--quantize-lm-head/--no-quantize-lm-head", quantize_lm_head, True), ("--quantize-embeddings/--no-quantize-embeddings", quantize_embeddings, None),
        ) if value != default]
        thresholds = kw.get("thresholds")
        if thresholds is not None:
            given += thresholds.given()
        if given and not quantize:
            raise click.UsageError(f"{', '.join(given)} needs --quantize int4 or int8")
        opts = QuantizeOptions(quantize, quant_block_size, quant_accuracy_level, quantize_lm_head, quantize_embeddings) if quantize else None
        return fn(*args, quantize=opts, **kw)

    for deco in reversed([
        click.option("--quantize", type=click.Choice(tuple(KINDS)), help="After the fusion, quantize the weight MatMuls (weight-only, blockwise, symmetric) into onnxruntime's MatMulNBits with onnxruntime's own quantizer; norms stay fused in fp32. The check then measures it against PyTorch fp32 (--min-top1, --min-top5, --max-kl, --min-cosine)."),
        click.option("--quant-block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), callback=lambda c, p, v: int(v), default=str(DEFAULT_BLOCK_SIZE), show_default=True, help="Weights per quantization block (along K), each with its own scale."),
        click.option("--quant-accuracy-level", type=click.IntRange(min(ACCURACY_LEVELS), max(ACCURACY_LEVELS)), default=DEFAULT_ACCURACY_LEVEL, show_default=True, help="MatMulNBits' compute type for the activations: 4 int8 (fastest on CPU), 3 bf16, 2 fp16, 1 fp32, 0 the op's default."),
        click.option("--quantize-lm-head/--no-quantize-lm-head", default=True, show_default=True, help="Quantize the MatMul that makes the logits."),
        click.option("--quantize-embeddings/--no-quantize-embeddings", default=None, help="Quantize the embedding table too (onnxruntime's GatherBlockQuantized, int4 only). Default: only where the LM head shares the table (tied word embeddings) and is quantized to int4; the Gather then reads the head's int4 blocks, so the table is stored once."),
    ]):
        merged = deco(merged)
    return merged


class FiniteFloat(click.FloatRange):
    """click's FloatRange that also refuses nan and inf (a bound of nan would fail every check)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def threshold_options(fn):
    """The quantized check's bounds as one ``thresholds`` argument (quant_check.Thresholds;
    a bound not given is None: the quantization kind's default)."""
    from normexport.quant_check import DEFAULT_THRESHOLDS, Thresholds

    def by_kind(name: str) -> str:
        return ", ".join(f"{kind} {getattr(t, name)}" for kind, t in DEFAULT_THRESHOLDS.items())

    @wraps(fn)
    def merged(*args, min_top1, min_top5, max_kl, min_cosine, **kw):
        return fn(*args, thresholds=Thresholds(min_top1, min_top5, max_kl, min_cosine), **kw)

    unit = FiniteFloat(0.0, 1.0)
    for deco in reversed([
        click.option("--min-top1", type=unit, help=f"Quantized check: least fraction of positions whose top-1 token is PyTorch's, or one PyTorch rates at least half as likely (a near-tie) [default: {by_kind('min_top1')}]."),
        click.option("--min-top5", type=unit, help=f"Quantized check: least mean share of the top-5 tokens that are in PyTorch's top 5, or that PyTorch rates at least half as likely as its 5th [default: {by_kind('min_top5')}]."),
        click.option("--max-kl", type=FiniteFloat(0.0), help=f"Quantized check: largest mean KL divergence (nats) from PyTorch's next-token distribution [default: {by_kind('max_kl')}]."),
        click.option("--min-cosine", type=FiniteFloat(-1.0, 1.0), help=f"Quantized check: least cosine similarity of any position's logits with PyTorch's [default: {by_kind('min_cosine')}]."),
    ]):
        merged = deco(merged)
    return merged


force_option = click.option("--force", is_flag=True, help="Replace an existing file at --report / --plot (or -o) that normexport did not write. Never an input.")


def _factory_file(factory: str | None):
    """The factory's source file: an input no output may overwrite, however it is spelled."""
    from normexport.factory import factory_source

    return factory_source(factory)


def validate_options(fn):
    for deco in reversed(
        [
            click.option("--atol", multiple=True, callback=_parse_tolerances, metavar="[OUTPUT=]VALUE", help="Absolute tolerance, for all outputs or (OUTPUT=VALUE, repeatable) one ONNX output (default by dtype: fp32 1e-4, fp16 1e-2, bf16 5e-2)."),
            click.option("--rtol", multiple=True, callback=_parse_tolerances, metavar="[OUTPUT=]VALUE", help="Relative tolerance, likewise (default by dtype: fp32 1e-3, fp16 1e-2, bf16 2e-2)."),
            click.option("--samples", type=click.IntRange(*SAMPLES), default=2, show_default=True, help="Seeded input draws (fp16/bf16 models get one large-magnitude draw more)."),
            click.option("--stress/--no-stress", default=None, help="Run each fused norm alone on large-magnitude, tiny and zero rows against a float64 RMSNorm (default: on for fp16/bf16 norms)."),
        ]
    ):
        fn = deco(fn)
    return fn


def bench_options(fn):
    for deco in reversed(
        [
            click.option("--warmup", type=click.IntRange(*WARMUP), default=5, show_default=True),
            click.option("--iters", type=click.IntRange(*ITERS), default=30, show_default=True),
        ]
    ):
        fn = deco(fn)
    return fn


@click.group(cls=NormexportGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="normexport")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug):
    """Export PyTorch models with RMSNorm to ONNX / TensorRT, every RMSNorm fused, validated and timed."""


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Fused model path (default: MODEL's folder, named after it and the target).")
@click.option("--target", type=click.Choice(TARGETS), default=TARGETS[0], show_default=True, help=targets_help())
@click.option("--opset", type=click.IntRange(*OPSET), help="Export opset (default 20; TorchScript models at most 20).")
@residual_options("as --backend's record says (kept separate on onnxruntime's CPU, where the folded op is slower; folded on GPU backends).")
@click.option("--exporter", type=click.Choice(EXPORTERS), default="auto", show_default=True, help="auto: dynamo, or TorchScript for ScriptModules.")
@model_options
@validate_options
@bench_options
@click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_BACKEND, show_default=True, help="Where the ONNX models run for validation and bench: " + backends_help())
@click.option("--no-validate", is_flag=True, help="Skip validation.")
@click.option("--no-bench", is_flag=True, help="Skip the latency benchmark.")
@click.option("--keep-failed", is_flag=True, help="Write the fused model even when validation fails.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@force_option
@threshold_options
@quantize_options
@hf_convert_options
@_handle_errors
def convert(model, output, target, residual, opset, exporter, inputs, factory, trust_pickle, dtype, seed, threads, atol, rtol, samples, stress, warmup, iters, backend, no_validate, no_bench, keep_failed, report_path, force, quantize, thresholds, **hf):
    """Load MODEL, export it to ONNX, fuse every RMSNorm, validate against PyTorch and time it.

    MODEL may be a Hugging Face folder (config.json + safetensors): it becomes OUTDIR with a
    KV-cache decoder (model.onnx, genai_config.json, tokenizer files), its greedy generation
    checked token by token against transformers.

    Exit 0: fused and validated; 1: validation failed; 2: bad input or usage."""
    from normexport import pipeline, report
    from normexport.outputs import Output, check

    folder = route_folder(model)  # a Hugging Face folder: normexport.hf converts it into an output folder
    if folder:
        from normexport.hf.convert import default_output as folder_output, output_folder

        refuse_for_folder("convert")
        out = output_folder(output or folder_output(model, target))
    else:
        if model.is_dir():
            raise NormexportError(f"{model} is a directory with no config.json or safetensors, so not a Hugging Face model folder either", "pass a PyTorch model file, or a folder save_pretrained wrote")
        out = Output("-o", output or pipeline.default_output(model, target), "onnx")
    check([model, _factory_file(factory)], [out, Output("--report", report_path, "report")], force)

    opts = pipeline.ConvertOptions(
        load=pipeline.LoadOptions(inputs=inputs, factory=factory, trust_pickle=trust_pickle, dtype=dtype),
        export=pipeline.ExportOptions(opset=opset, exporter=exporter, seed=seed),
        fuse=pipeline.FuseOptions(target=target, residual=residual),
        validate=None if no_validate else pipeline.ValidateOptions(backend=backend, atol=atol, rtol=rtol, samples=samples, seed=seed, threads=threads, dtype=dtype, stress=stress, quant_thresholds=thresholds),
        bench=None if no_bench else pipeline.BenchOptions(backend=backend, warmup=warmup, iters=iters, threads=threads, seed=seed, dtype=dtype),
        quantize=quantize, output=output if folder else out.path, keep_failed=keep_failed,  # a file's default output, resolved once
    )
    err = report.console(stderr=True)
    # Progress only on an interactive terminal: piped, the only stderr lines are errors.
    progress = (lambda s: err.print(f"[dim]... {escape(s)}[/dim]")) if err.is_terminal else (lambda s: None)
    if folder:
        return convert_hf(model, opts, hf, report_path, progress)
    refuse_folder_options(hf)
    result = pipeline.convert(model, opts, progress=progress)
    report.print_convert(report.console(), result)
    if report_path:
        report.write_json(result.to_json(), report_path)
    return result


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Fused model path (default: MODEL's folder, named after it and the target).")
@click.option("--target", type=click.Choice(TARGETS), default=TARGETS[0], show_default=True, help=targets_help())
@residual_options("fold (fuse knows no backend: the GPU layout); for onnxruntime on CPU give off.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the fusion report as JSON.")
@click.option("--allow-none", is_flag=True, help="Exit 0 even when no RMSNorm is found (the model is then written unchanged).")
@force_option
@_handle_errors
def fuse(model, output, target, residual, report_path, allow_none, force):
    """Fuse every RMSNorm subgraph of an ONNX MODEL for a target runtime."""
    from normexport import report
    from normexport.fuse import fuse_file
    from normexport.outputs import Output, check

    out = output or model.with_name(f"{model.stem}.{target}.onnx")
    check([model], [Output("-o", out, "onnx"), Output("--report", report_path, "report")], force)
    result = fuse_file(model, out, target, residual=residual, allow_none=allow_none)
    c = report.console()
    report.print_fusion(c, result)
    c.print(f"wrote [bold]{escape(str(out))}[/bold]")
    if report_path:
        report.write_json({"model": str(model), "target": target, "output": str(out), "fusion": result.to_json()}, report_path)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--factory", metavar="MODULE:FUNCTION", help="For a state_dict: a function that builds the nn.Module.")
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling a whole pickled module, or .pt2 members that need more than tensors (runs code from the file).")
@_handle_errors
def inspect(model, as_json, factory, trust_pickle):
    """List the RMSNorms in MODEL (.onnx subgraphs, or PyTorch modules) and the near-misses."""
    from normexport import report
    from normexport.inspect import inspect_path

    result = inspect_path(model, factory=factory, trust_pickle=trust_pickle)
    if as_json:
        click.echo(report.json_text(result))
    else:
        report.print_inspect(report.console(), result)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("fused", type=click.Path(path_type=Path))
@click.option("--unfused", type=click.Path(path_type=Path), help="Also compare this unfused ONNX export.")
@model_options
@validate_options
@click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_BACKEND, show_default=True, help=backends_help())
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@force_option
@threshold_options
@_handle_errors
def validate(model, fused, unfused, inputs, factory, trust_pickle, dtype, seed, threads, atol, rtol, samples, stress, backend, report_path, force, thresholds):
    """Compare FUSED (ONNX) with the PyTorch MODEL, output by output; name the first diverging norm.

    A Hugging Face folder DIR and the OUTDIR `convert DIR` wrote: the generation check, or, for a
    quantized OUTDIR (MatMulNBits), the quantized check on --min-top1/--min-top5/--max-kl/--min-cosine.

    Exit 0: match; 1: mismatch; 2: bad input or usage."""
    from normexport import pipeline, report
    from normexport.outputs import Output, check

    check([model, fused, unfused, _factory_file(factory)], [Output("--report", report_path, "report")], force)

    load = pipeline.LoadOptions(inputs=inputs, factory=factory, trust_pickle=trust_pickle, dtype=dtype)
    opts = pipeline.ValidateOptions(backend=backend, atol=atol, rtol=rtol, samples=samples, seed=seed, threads=threads, dtype=dtype, stress=stress, quant_thresholds=thresholds)
    if route_folder(model):  # a Hugging Face folder and the folder `convert DIR` wrote
        refuse_for_folder("validate")
        return validate_hf(model, fused, load, opts, report_path)
    if unfused is not None:
        pipeline.require_regular_file(unfused, "ONNX")
    loaded, specs = pipeline.prepare_model_for(model, fused, load)
    from normexport.quantize import quantized_kind

    kind = quantized_kind(fused)
    if kind:  # a quantized model: measured on the thresholds, not compared exactly
        from normexport.quant_check import print_quantized

        result = pipeline.check_quantized_file(loaded, specs, fused, opts, kind)
        print_quantized(report.console(), None, result)
        if report_path:
            report.write_json({"model": str(model), "fused": str(fused), "quantized_accuracy": result.to_json()}, report_path)
        return result
    if thresholds.given():
        raise NormexportError(f"{', '.join(thresholds.given())} bound the quantized check, but {fused} is not quantized", "drop the option (a float model is compared output by output)")
    result = pipeline.validate_models(loaded, specs, unfused, fused, opts)
    report.print_validation(report.console(), result)
    if report_path:
        report.write_json({"model": str(model), "fused": str(fused), "validation": result.to_json()}, report_path)
    return result


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("fused", type=click.Path(path_type=Path))
@click.option("--unfused", type=click.Path(path_type=Path), help="The unfused ONNX export to time beside it (default: exported from MODEL).")
@model_options
@bench_options
@click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_BACKEND, show_default=True, help=backends_help())
@click.option("--plot", type=click.Path(path_type=Path), help="Write a bar chart of the latencies (PNG; needs matplotlib).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@force_option
@hf_bench_options
@_handle_errors
def bench(model, fused, unfused, inputs, factory, trust_pickle, dtype, seed, threads, warmup, iters, backend, plot, report_path, force, **hf):
    """Time PyTorch eager, the unfused and the FUSED ONNX model side by side, and the normalization share."""
    from normexport import pipeline, report
    from normexport.outputs import Output, check

    check([model, fused, unfused, _factory_file(factory)], [Output("--plot", plot, "plot"), Output("--report", report_path, "report")], force)

    load = pipeline.LoadOptions(inputs=inputs, factory=factory, trust_pickle=trust_pickle, dtype=dtype)
    opts = pipeline.BenchOptions(backend=backend, warmup=warmup, iters=iters, threads=threads, seed=seed, dtype=dtype)
    if route_folder(model):  # a Hugging Face folder and the folder `convert DIR` wrote
        refuse_for_folder("bench")
        return bench_hf(model, fused, load, opts, report_path, hf)
    refuse_folder_options(hf)
    if unfused is not None:
        pipeline.require_regular_file(unfused, "ONNX")
    loaded, specs = pipeline.prepare_model_for(model, fused, load)
    result = pipeline.bench_onnx(loaded, specs, fused, unfused, opts)
    c = report.console()
    report.print_bench(c, result)
    if plot:
        from normexport.plot import plot_bench

        plot_bench(result, plot, title=f"{model.name}: latency ({backend}, {result.threads} threads)")
        c.print(f"wrote [bold]{escape(str(plot))}[/bold]")
    if report_path:
        report.write_json({"model": str(model), "fused": str(fused), "bench": result.to_json()}, report_path)


def _register_optional_commands() -> None:
    """Commands whose modules live beside the core (the plugin build, ln2rms); one that fails to import says why when run."""
    try:
        from normexport.plugin.cli import plugin_cli

        for sub in plugin_cli.commands.values():
            _wrap_command(sub)
        main.add_command(plugin_cli, "plugin")
    except ImportError as e:
        main.add_command(_unavailable_command("plugin", e))
    main.add_command(_wrap_command(generate_command), "generate")
    try:
        from normexport.ln2rms import ln2rms_command

        main.add_command(_wrap_command(ln2rms_command), "ln2rms")
    except ImportError as e:
        main.add_command(_unavailable_command("ln2rms", e))


def _unavailable_command(name: str, error: ImportError) -> click.Command:
    """Stands in for a command whose module failed to import: any use is one error line and a hint, exit 2."""

    @click.command(name, help=f"Unavailable: {error}", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command() -> None:
        raise NormexportError(
            f"normexport {name} is unavailable: {error}",
            "reinstall normexport with its dependencies (pip install -e .); rerun with --debug for the traceback",
        ) from error

    return _wrap_command(command)


def _wrap_command(cmd):
    if cmd.callback is not None and not getattr(cmd.callback, "_normexport_wrapped", False):
        cmd.callback = _handle_errors(cmd.callback)
        cmd.callback._normexport_wrapped = True
    return cmd


_register_optional_commands()

if __name__ == "__main__":
    main()
