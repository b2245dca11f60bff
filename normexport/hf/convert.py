"""`normexport convert DIR` for a Hugging Face folder: load -> export (KV cache) -> fuse ->
check generation against transformers -> write OUTDIR (model.onnx, genai_config.json,
tokenizer files, normexport_report.json), all or nothing."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from normexport import outputs
from normexport.errors import NormexportError
from normexport.hf import ATTENTION_CHOICES
from normexport.hf.folder import HFModel, load_folder
from normexport.hf.generation import GENAI_CONFIG
from normexport.options import ValidateOptions
from normexport.quantize import check_quantize
from normexport.runners import require_onnxruntime, residual_layout

REPORT_NAME = "normexport_report.json"
MODEL_NAME = "model.onnx"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)
OUTPUT_FILES = (MODEL_NAME, f"{MODEL_NAME}.data", GENAI_CONFIG, REPORT_NAME, *TOKENIZER_FILES)  # all OUTDIR may hold


@dataclass
class HFOptions:
    """What a folder conversion takes beyond normexport.options.ConvertOptions."""

    task: str | None = None
    gen_tokens: int = 32
    trust_remote_code: bool = False
    attention_fusion: bool | None = None  # None: on for --target ort
    attention: str = "auto"  # one of normexport.hf.ATTENTION_CHOICES
    all_logits: bool = False  # a decoder with a cache: every position's logits, not each row's last


@dataclass
class HFConvertReport:
    model: str
    target: str
    output: str
    task: str = ""
    architecture: str = ""
    rmsnorm_modules: int = 0
    fusion: object = None  # FuseReport
    attention: object = None  # ort_attention.AttentionFusion
    attention_op: str = ""  # "GroupQueryAttention" or "generic"
    generation: object = None  # GenerationReport (the fp32 graph; before quantization where quantized)
    stress: object = None  # stress.StressReport: each fused norm alone on --backend
    quantization: object = None  # quantize.QuantizeReport
    quantized_accuracy: object = None  # quant_check.QuantizedAccuracy
    outputs: list = field(default_factory=list)  # OutputComparison (tasks without a cache)
    past_shapes: dict = field(default_factory=dict)  # past input -> (heads, head_dim), as exported (genai_config.json's)
    inputs: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)  # wall seconds per step
    steps_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds (all threads) per step
    peak_rss: dict[str, float] = field(default_factory=dict)  # the process's peak RSS (MiB) at the end of each step
    notes: list[str] = field(default_factory=list)
    written: bool = False

    @property
    def validation(self):
        return self  # the CLI reads .validation.passed

    @property
    def checked(self) -> bool:
        return self.generation is not None or self.quantized_accuracy is not None or bool(self.outputs) or self.stress is not None

    @property
    def passed(self) -> bool:
        gen_ok = self.generation is None or self.generation.passed
        stress_ok = self.stress is None or self.stress.passed
        quant_ok = self.quantized_accuracy is None or self.quantized_accuracy.passed
        return gen_ok and stress_ok and quant_ok and all(c.passed for c in self.outputs)

    def _outputs_json(self) -> list[dict]:
        """Each compared output: a task without a cache, its outputs; a decoder, its logits per
        prompt (the worst step of the generation check)."""
        if self.outputs or self.generation is None:
            return [c.to_json() for c in self.outputs]
        from normexport.hf.generation import json_float

        worst = lambda values, pick: json_float(pick(values, key=lambda v: float("inf") if v != v else v))  # NaN is the worst
        return [
            {"name": "logits", "sample": i, "steps": len(p.steps), "max_abs": worst([s.max_abs for s in p.steps], max),
             "max_rel": worst([s.max_rel for s in p.steps], max), "cosine": json_float(min(s.cosine for s in p.steps)), "passed": p.passed}
            for i, p in enumerate(self.generation.prompts) if p.steps
        ]

    def step(self, name: str, since: tuple[float, float]) -> None:
        """Record the step that began at ``since`` (a ``clock()``)."""
        import resource

        wall, cpu = clock()
        self.steps[name] = wall - since[0]
        self.steps_cpu[name] = cpu - since[1]
        self.peak_rss[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    def to_json(self) -> dict:
        return {
            "model": self.model, "target": self.target, "output": self.output if self.written else None,
            "kind": "huggingface", "task": self.task, "architecture": self.architecture,
            "inputs": self.inputs, "outputs": self.output_names,
            "rmsnorm_modules": self.rmsnorm_modules,
            "fusion": self.fusion.to_json() if self.fusion else None,
            "attention_op": self.attention_op or None,
            "attention_fusion": self.attention.to_json() if self.attention else None,
            "generation": self.generation.to_json() if self.generation else None,
            "stress": self.stress.to_json() if self.stress else None,
            "quantization": self.quantization.to_json() if self.quantization else None,
            "quantized_accuracy": self.quantized_accuracy.to_json() if self.quantized_accuracy else None,
            "validation": {"passed": self.passed, "outputs": self._outputs_json()} if self.checked else None,
            "steps_s": {k: round(v, 3) for k, v in self.steps.items()},
            "steps_cpu_s": {k: round(v, 3) for k, v in self.steps_cpu.items()},
            "peak_rss_mib_after": {k: round(v, 1) for k, v in self.peak_rss.items()},
            "notes": self.notes,
        }


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def default_output(path: Path, target: str) -> Path:
    path = Path(os.path.abspath(path))
    return path.with_name(f"{path.name}-onnx-{target}")


def output_folder(output, option: str = "-o"):
    """The folder output of ``convert DIR`` for the guard (normexport.outputs.check)."""
    from normexport.outputs import Output

    return Output(option, Path(output) if output is not None else None, "folder", OUTPUT_FILES)


def convert_folder(path, opts, hf_opts: HFOptions | None = None, progress=lambda s: None) -> HFConvertReport:
    """opts: normexport.options.ConvertOptions (fuse, load's dtype, validate, keep_failed, output)."""
    from normexport.fuse.registry import RECORDS

    path = Path(path)
    hf_opts = hf_opts or HFOptions()
    out = Path(opts.output) if opts.output else default_output(path, opts.fuse.target)
    outputs.check([path], [output_folder(out)])
    unused = [flag for flag, given in (("--factory", opts.load.factory), ("--input", opts.load.inputs), ("--opset", opts.export.opset)) if given]
    if unused or opts.export.exporter not in ("auto", "dynamo"):
        raise NormexportError(
            f"{', '.join(unused) or '--exporter torchscript'} does not apply to a Hugging Face folder",
            "the folder's config.json defines the model and its inputs; drop the option",
        )
    target = opts.fuse.record  # resolved when the options were made: an unknown target never gets here
    if opts.validate:
        require_onnxruntime(opts.validate.record, "the generation check of a Hugging Face folder")
    if hf_opts.attention_fusion and not target.onnxruntime_ops:
        runs_with = ", ".join(t.name for t in RECORDS if t.onnxruntime_ops)
        raise NormexportError(f"--attention-fusion makes onnxruntime ops; it does not apply to --target {target.name}", f"use --target {runs_with}, or drop --attention-fusion")
    check_quantize(opts)
    if hf_opts.attention not in ATTENTION_CHOICES:
        raise NormexportError(f"unknown --attention '{hf_opts.attention}'", f"one of {', '.join(ATTENTION_CHOICES)}")
    if hf_opts.attention == "gqa" and not target.onnxruntime_ops:
        runs_with = ", ".join(t.name for t in RECORDS if t.onnxruntime_ops)
        raise NormexportError(f"--attention gqa makes onnxruntime's GroupQueryAttention; it does not apply to --target {target.name}", f"use --target {runs_with}, or --attention generic")
    if hf_opts.all_logits and hf_opts.task not in (None, "text-generation-with-past"):
        raise NormexportError(f"--all-logits applies to decoders with a KV cache; --task {hf_opts.task} outputs every position already", "drop --all-logits")
    t = clock()
    progress(f"loading {path} with transformers (local files only)")
    hf = load_folder(path, hf_opts.task, opts.load.dtype, opts.load.trust_pickle, hf_opts.trust_remote_code)
    from normexport.norm_modules import refuse_without_rmsnorm

    refuse_without_rmsnorm(hf.module, f"{path} ({hf.architecture})", path)  # before any export
    if hf_opts.all_logits and hf.task != "text-generation-with-past":
        raise NormexportError(f"--all-logits applies to decoders with a KV cache; {path} exports as {hf.task}", "drop --all-logits")
    report = HFConvertReport(str(path), opts.fuse.target, str(out), task=hf.task, architecture=hf.architecture, notes=list(hf.notes))
    report.step("load", t)
    if opts.validate and hf.task == "text-generation-with-past":  # before any export: the check would run past the context
        from normexport.hf.generation import require_check_window

        require_check_window(getattr(hf.text_config, "max_position_embeddings", None), hf_opts.gen_tokens)
    gqa = choose_attention(hf, opts, hf_opts, report)
    from normexport.hf.kv_export import fresh_workdir, remove

    try:
        work = fresh_workdir(out.parent)
    except OSError as e:
        raise NormexportError(f"cannot write into {out.parent} ({e.strerror})", "give a writable output folder with -o") from None
    try:
        staged = work / "out"
        staged.mkdir()
        fused = work / "fp32" / MODEL_NAME if opts.quantize else staged / MODEL_NAME
        model = _export_and_fuse(hf, opts, report, fused, progress, attention_wanted(opts, hf_opts, gqa is not None), gqa, hf_opts.all_logits)
        if not opts.quantize:
            model = None  # written: the memory goes back before the check
        if opts.validate:
            t = clock()
            progress("checking generation against transformers")
            _validate(hf, opts.validate, hf_opts, report, fused, keep_module=opts.quantize is not None)
            _stress(opts.validate, report, fused, progress)
            report.step("validate", t)
        else:
            report.notes.append("not validated (--no-validate): nothing was compared with transformers")
        if opts.quantize:
            _quantize(model, opts, report, staged / MODEL_NAME, progress)
            del model
            remove(fused.parent)
            if opts.validate and hf.task == "text-generation-with-past":
                t = clock()
                progress("measuring the quantized decoder against transformers (fp32)")
                _check_quantized(hf, opts.validate, hf_opts, report, staged / MODEL_NAME, opts.quantize.kind)
                report.step("validate_quantized", t)
            elif opts.validate and hf.task == "text-generation":
                t = clock()
                progress("measuring the quantized model's logits against transformers (fp32)")
                _check_quantized_no_cache(hf, opts.validate, report, staged / MODEL_NAME, opts.quantize.kind)
                report.step("validate_quantized", t)
            elif opts.validate:
                report.notes.append(f"the quantized {hf.task} model is not compared with transformers: its output is hidden states, and the quantized check's measures are those of logits")
        if report.passed or opts.keep_failed:
            _write_folder(hf, staged, report, out, gqa is not None)
        else:
            report.notes.append(f"validation failed: {out} not written (--keep-failed writes it anyway)")
    finally:
        remove(work)
    return report


def _quantize(model, opts, report: HFConvertReport, dst: Path, progress) -> None:
    from normexport.fuse import save_onnx
    from normexport.quantize import quantize_model

    t = clock()
    progress(f"quantizing the weight MatMuls to {opts.quantize.kind} (onnxruntime's MatMulNBitsQuantizer)")
    quantized, report.quantization = quantize_model(model, opts.quantize)
    save_onnx(quantized, dst)
    report.step("quantize", t)


def _check_quantized(hf: HFModel, opts: ValidateOptions, hf_opts: HFOptions, report: HFConvertReport, model_path: Path, kind: str) -> None:
    """The quantized decoder against transformers in fp32 (statistics, thresholds), and every
    fused norm of the quantized graph alone against a float64 RMSNorm."""
    import torch

    from normexport.quant_check import compare_quantized, quantized_runs
    from normexport.stress import stress_check

    if opts.threads:
        torch.set_num_threads(opts.threads)
    runs = _onnx_runs(hf, model_path, opts, kind, lambda decoder: quantized_runs(hf.module, decoder, hf_opts.gen_tokens, opts.seed))
    result = compare_quantized(hf.module, runs, opts.quant_thresholds.resolved(kind))
    result.stress = stress_check(model_path, None, opts, opts.seed)
    report.quantized_accuracy = result


QUANT_NO_CACHE_SEQ = 32  # token ids per sequence of the quantized check without a cache


def _check_quantized_no_cache(hf: HFModel, opts: ValidateOptions, report: HFConvertReport, model_path: Path, kind: str) -> None:
    """A quantized decoder without a cache: its logits at every position of ``opts.samples``
    seeded sequences of token ids against transformers in fp32 (quant_check's measures and
    thresholds), and every fused norm of the quantized graph alone."""
    import torch

    from normexport.quant_check import QuantizedAccuracy, check_quantized_outputs
    from normexport.stress import stress_check

    if opts.threads:
        torch.set_num_threads(opts.threads)
    result = QuantizedAccuracy(opts.quant_thresholds.resolved(kind))
    for _, ref, got in _no_cache_outputs(hf, model_path, opts, "logits", seq=QUANT_NO_CACHE_SEQ, batch=1, optimize=True):
        check_quantized_outputs({"logits": ref}, {"logits": got}, result)
    result.notes.append(f"{max(1, opts.samples)} seeded sequences of {QUANT_NO_CACHE_SEQ} token ids drawn across the vocabulary; the logits at every position compared")
    result.stress = stress_check(model_path, None, opts, opts.seed)
    report.quantized_accuracy = result


def attention_wanted(opts, hf_opts: HFOptions, gqa: bool = False) -> bool:
    """onnxruntime's fusion pass: by default for --target ort on the generic attention graph (a
    GroupQueryAttention graph has no attention or rotary left for it; --attention-fusion still
    runs it there, packing the gate/up MatMuls)."""
    if hf_opts.attention_fusion is not None:
        return hf_opts.attention_fusion
    return opts.fuse.record.onnxruntime_ops and not gqa


def choose_attention(hf: HFModel, opts, hf_opts: HFOptions, report: HFConvertReport):
    """A normexport.hf.gqa.GQAPlan when the decoder is exported with GroupQueryAttention, else
    None (the generic attention graph; with auto, the reason is noted)."""
    from normexport.hf.gqa import gqa_plan

    report.attention_op = "generic"
    if hf_opts.attention == "generic" or not opts.fuse.record.onnxruntime_ops:
        return None
    plan, reason = gqa_plan(hf)
    if plan is None and hf_opts.attention == "gqa":
        raise NormexportError(f"--attention gqa: {hf.architecture} does not fit GroupQueryAttention ({reason})", "use --attention generic (or auto) for this model")
    if plan is None:
        if hf.task == "text-generation-with-past":
            report.notes.append(f"generic attention graph, not GroupQueryAttention: {reason}")
        return None
    report.attention_op = "GroupQueryAttention"
    return plan


def logits_note(model, all_logits: bool) -> str:
    """What the decoder's logits output holds: each row's last token, or every position."""
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    if logits.shape is not None and len(logits.shape) == 3 and logits.shape[1] == 1:
        return "logits: each row's last token only ([batch, 1, vocab]: the LM head runs once per row in the prefill, not once per prompt token; --all-logits keeps every position)"
    why = "--all-logits" if all_logits else "the model has no output embedding to read one row from"
    return f"logits: every position ([batch, sequence, vocab]; {why})"


def _export_and_fuse(hf: HFModel, opts, report: HFConvertReport, dst: Path, progress, attention: bool = False, gqa=None, all_logits: bool = False):
    from normexport.fuse import fuse_model, save_onnx
    from normexport.hf.kv_export import count_rmsnorm_modules, export_decoder
    from normexport.fuse.report import require_norms

    t = clock()
    progress(f"exporting {hf.architecture} ({hf.task}) with torch.onnx" + (", attention as GroupQueryAttention" if gqa else ""))
    exp = export_decoder(hf, attention_form=attention and gqa is None, gqa=gqa, all_logits=all_logits)
    report.inputs, report.output_names = exp.input_names, exp.output_names
    report.step("export", t)
    if hf.task == "text-generation-with-past":
        from normexport.hf.genai_config import past_shapes

        report.notes.append(logits_note(exp.model, all_logits))
        report.past_shapes = past_shapes(exp.model)
    t = clock()
    progress(f"fusing RMSNorm for target {opts.fuse.target}")
    fold, layout = residual_layout(opts.fuse.residual, opts.backend, opts.fuse.record)
    report.notes.append(layout)
    fusion = fuse_model(exp.model, opts.fuse.record, residual=fold)
    report.fusion = fusion
    report.rmsnorm_modules = count_rmsnorm_modules(hf.module)
    require_norms(fusion, f"{hf.path} ({hf.architecture})", "this model has none it recognises")
    if fusion.fused < report.rmsnorm_modules:
        report.notes.append(f"{report.rmsnorm_modules} RMSNorm modules in PyTorch, {fusion.fused} fused norms in the graph")
    if attention:
        _fuse_attention(exp.model, report, progress, opts.fuse.target, fold)
        _check_loads(exp.model, fusion)
    if opts.fuse.record.onnxruntime_ops:
        from normexport.hf.ort_attention import fuse_transposed_weights

        if fuse_transposed_weights(exp.model):
            report.notes.append("the LM head reads the embedding table it shares transposed: onnxruntime's FusedMatMul (transB=1) instead of Transpose + MatMul, which onnxruntime would fold into a transposed copy at load")
    save_onnx(exp.model, dst)
    report.step("fuse", t)
    return exp.model


def _check_loads(model, fusion) -> None:
    """After onnxruntime's own fusions: the model still loads in onnxruntime (fuse_model checked
    the norm fusion the same way, where the export loaded)."""
    from normexport.fuse.files import runtime_copy, runtime_load_error

    if any("loads neither" in n for n in fusion.notes):
        return
    data = runtime_copy(model)
    why = runtime_load_error(data) if data is not None else None
    if why:
        raise NormexportError(f"after the attention fusions onnxruntime cannot load the model ({why}); nothing written",
                              "convert with --no-attention-fusion")


def _fuse_attention(model, report: HFConvertReport, progress, target: str, fold: bool) -> None:
    """onnxruntime's attention/rotary fusions after the norms; every fused norm must survive.
    They fold residual Adds into skip norms: with --no-residual-fusion the norms are lowered
    again without them."""
    from normexport.fuse import fuse_model
    from normexport.hf.ort_attention import fuse_attention, fused_norms, op_counts, quiet_passes

    progress("fusing attention and rotary embeddings for onnxruntime")
    norms = fused_norms(op_counts(model))
    report.attention = fuse_attention(model)
    if not fold:
        with quiet_passes():  # ONNX's shape inference cannot see into the contrib ops
            fuse_model(model, target, residual=False)
        report.attention.recount(model)
    if fused_norms(report.attention.after) < norms:
        raise AssertionError(f"the attention fusions unfused norms: {norms} fused before, {fused_norms(report.attention.after)} after")


def _validate(hf: HFModel, opts: ValidateOptions, hf_opts: HFOptions, report: HFConvertReport, model_path: Path, keep_module: bool = False) -> None:
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    dtype = opts.dtype or "float32"
    if hf.task == "text-generation-with-past":
        from normexport.hf.generation import compare_generation, onnx_generation

        t = clock()
        runs = _onnx_runs(hf, model_path, opts, dtype, lambda decoder: onnx_generation(decoder, hf.text_config.vocab_size, hf_opts.gen_tokens, opts.seed, prompts=opts.samples))
        report.step("validate: onnxruntime", t)
        report.generation = compare_generation(hf.module, runs, dtype, hf_opts.gen_tokens, atol=opts.atol, rtol=opts.rtol)
        if not keep_module:
            hf.module = None
        return
    report.outputs = _compare_no_cache(hf, model_path, opts)


def _onnx_runs(hf: HFModel, model_path: Path, opts: ValidateOptions, dtype: str, run):
    """onnxruntime's side of a check: ``run(decoder)`` on the written decoder, with transformers'
    weights handed back to the kernel while the session holds the export's, and the session's
    memory handed back before transformers reads them again."""
    from normexport.hf.generation import OnnxDecoder
    from normexport.hf.memory import page_out_weights, trim_heap

    page_out_weights(hf)
    try:
        decoder = OnnxDecoder(model_path, threads=opts.threads, backend=opts.record, spinning=False)
    except NormexportError as e:
        reason = e.message.split("(", 1)[-1].rstrip(")")
        raise NormexportError(
            f"onnxruntime ({opts.backend}) cannot run the exported {dtype} decoder, so it cannot be checked: {reason}",
            "convert in float32 or float16, or pass --no-validate to write it unchecked",
        ) from None
    try:
        return run(decoder)
    finally:
        del decoder
        trim_heap()


def _stress(opts: ValidateOptions, report: HFConvertReport, model_path: Path, progress) -> None:
    """Each fused norm alone on --backend, as for a model file (--stress, or by default where
    the norms take fp16/bf16 inputs): the same stage, on the decoder's norms."""
    from normexport.stress import stress_check, wanted

    if wanted(opts.stress, opts.dtype, model_path):
        progress("stress-checking each fused norm alone")
        report.stress = stress_check(model_path, None, opts, opts.seed)


def _compare_no_cache(hf: HFModel, model_path: Path, opts) -> list:
    """Tasks without a cache: one output against PyTorch on seeded token ids."""
    from normexport.validate import compare_outputs

    name = "logits" if hf.task == "text-generation" else "last_hidden_state"
    results = []
    for i, ref, got in _no_cache_outputs(hf, model_path, opts, name, seq=9, batch=2, optimize=False):
        results += compare_outputs({name: ref}, {name: got.astype("float32")}, opts.atol, opts.rtol, sample=i)
    return results


def _no_cache_outputs(hf: HFModel, model_path: Path, opts, name: str, seq: int, batch: int, optimize: bool):
    """(sample, PyTorch's ``name``, ONNX's) on ``opts.samples`` seeded batches of token ids
    drawn across the vocabulary, for a model exported without a cache."""
    import torch

    from normexport.hf.kv_export import DecoderNoCache, example_inputs, kv_layout
    from normexport.runners import make_onnx_runner

    wrapper = DecoderNoCache(hf.module, name).eval()
    with make_onnx_runner(model_path, opts.record, optimize=optimize, threads=opts.threads, dtype=opts.dtype) as runner:
        for i in range(max(1, opts.samples)):
            feed = example_inputs(kv_layout(hf.text_config), torch.float32, batch=batch, seq=seq, with_past=False, seed=opts.seed + i)
            with torch.inference_mode():
                ref = wrapper(**feed).float().numpy()
            yield i, ref, runner.infer({k: v.numpy() for k, v in feed.items()})[name]


def _write_folder(hf: HFModel, staged: Path, report: HFConvertReport, out: Path, gqa: bool = False) -> None:
    from normexport.hf.genai_config import genai_cache_refusal, genai_config
    from normexport.report import write_json

    for name in TOKENIZER_FILES:
        src = hf.path / name
        if src.is_file():
            shutil.copyfile(src, staged / name)
    if hf.task == "text-generation-with-past":
        refusal = genai_cache_refusal(report.past_shapes)
        if refusal is None:
            (staged / GENAI_CONFIG).write_text(json.dumps(genai_config(hf, gqa, next(iter(report.past_shapes.values()), None)), indent=4))
        else:
            report.notes.append(f"{GENAI_CONFIG} not written: {refusal}; the folder runs on onnxruntime (normexport generate, or your own loop)")
    report.written = True
    write_json(report.to_json(), staged / REPORT_NAME)  # marked as normexport's: a rerun may replace the folder
    outputs.install_folder(staged, out, OUTPUT_FILES)  # the folder appears whole or not at all
