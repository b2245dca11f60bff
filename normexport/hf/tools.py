"""`inspect DIR`, `validate DIR OUTDIR` and `bench DIR OUTDIR` for Hugging Face folders.

    inspect DIR            the RMSNorm modules transformers builds, each marked fused or not
                           after an export and fusion on a copy (nothing is written)
    validate DIR OUTDIR    the generation check (per-step logits, greedy tokens) of the folder
                           `convert DIR` wrote against transformers
    bench DIR OUTDIR       prefill ms and decode ms/token: transformers eager with its cache,
                           the unfused export and OUTDIR's model, interleaved rounds
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from normexport.errors import NormexportError


def refuse_model_file_options(given: dict[str, object]) -> None:
    """Options that describe a model file mean nothing for a folder: exit 2, not ignored."""
    used = [flag for flag, value in given.items() if value]
    if used:
        raise NormexportError(f"{', '.join(used)} does not apply to a Hugging Face folder", "the folder's config.json defines the model and its inputs; drop the option")


def written_folder(path: Path) -> Path:
    """OUTDIR that `convert DIR` wrote: a folder holding model.onnx (not the source folder)."""
    from normexport.hf import is_hf_folder

    path = Path(path)
    if path.is_dir() and (path / "model.onnx").is_file():
        return path
    if is_hf_folder(path):
        raise NormexportError(f"{path} is a Hugging Face model folder, not a converted one", "pass the folder `normexport convert DIR -o OUTDIR` wrote (it holds model.onnx)")
    raise NormexportError(f"{path} holds no model.onnx", "pass the folder `normexport convert DIR -o OUTDIR` wrote")


def inspect_folder(path: Path, trust_pickle: bool = False) -> dict:
    from normexport.fuse import fuse_model
    from normexport.fuse.registry import PLAIN_TARGET
    from normexport.hf.folder import load_folder
    from normexport.hf.kv_export import export_decoder

    hf = load_folder(path, trust_pickle=trust_pickle)
    modules = [_module_json(name, m) for name, m in hf.module.named_modules() if name and type(m).__name__.endswith("RMSNorm")]
    result = {"model": str(path), "kind": f"huggingface ({hf.architecture})", "modules": modules, "norms": [], "near_misses": [], "notes": list(hf.notes)}
    exp = export_decoder(hf)
    report = fuse_model(exp.model, PLAIN_TARGET)
    names = [m["module"] for m in modules]
    for f in report.fused_norms:  # the exporter's scope names carry the wrapper's prefixes: the module's own path
        f.module = next((n for n in names if f.module == n or f.module.endswith("." + n)), f.module)
    for s in report.skipped:
        s.module = next((n for n in names if s.module == n or s.module.endswith("." + n)), s.module)
    result["norms"] = [{"module": f.module, "pattern": f.pattern, "epsilon": f.epsilon, "axis": f.axis, "dtype": f.dtype, "scale": f.scale, "bias": f.bias, "residual": f.residual} for f in report.fused_norms]
    result["near_misses"] = [{"node": s.node, "module": s.module, "reason": s.reason} for s in report.skipped]
    fused = {f.module for f in report.fused_norms if f.module}
    for m in modules:
        m["status"] = "fused" if m["module"] in fused else "not found in the export"
    if any(m["status"] != "fused" for m in modules) and report.fused == len(modules):
        for m in modules:
            m["status"] = "fused"
        result["notes"].append("norm modules paired with fused norms by order (the export recorded partial module names)")
    result["notes"].append(f"exported ({hf.task}) and fused on a copy (target {PLAIN_TARGET.name}); {report.fused} fused norms for {len(modules)} RMSNorm modules")
    return result


def _module_json(name: str, m) -> dict:
    eps = next((getattr(m, a) for a in ("variance_epsilon", "eps", "epsilon") if isinstance(getattr(m, a, None), (float, int))), None)
    weight = getattr(m, "weight", None)
    return {"module": name, "class": type(m).__name__, "eps": eps, "weight": list(weight.shape) if weight is not None else None, "status": "", "reason": ""}


@dataclass
class FolderValidation:
    """validate DIR OUTDIR: the generation check, and each fused norm alone (stress) where wanted."""

    generation: object  # GenerationReport
    stress: object = None  # StressReport

    @property
    def passed(self) -> bool:
        return bool(self.generation.passed) and (self.stress is None or bool(self.stress.passed))

    def to_json(self) -> dict:
        return {"generation": self.generation.to_json(), "stress": self.stress.to_json() if self.stress else None, "passed": self.passed}


def validate_folder(path: Path, out: Path, load, opts, gen_tokens: int):
    """The generation check of OUTDIR's decoder against transformers on ``opts.samples``
    prompts, on ``opts.backend``, then each fused norm alone where ``opts.stress`` wants it
    (FolderValidation); for a quantized OUTDIR, the quantized check with its own stress check
    (quant_check.QuantizedAccuracy)."""
    from normexport.stress import stress_check, wanted

    result = _check_folder_generation(path, out, load, opts, gen_tokens)
    if hasattr(result, "thresholds"):  # the quantized check
        return result
    model = written_folder(out) / "model.onnx"
    stress = stress_check(model, None, opts, opts.seed) if wanted(opts.stress, opts.dtype, model) else None
    return FolderValidation(result, stress)


def _check_folder_generation(path: Path, out: Path, load, opts, gen_tokens: int):
    import torch

    from normexport.hf.folder import load_folder
    from normexport.hf.generation import OnnxDecoder, check_generation, context_length, require_check_window
    from normexport.quantize import quantized_kind

    decoder = OnnxDecoder(written_folder(out), threads=opts.threads, backend=opts.record)
    require_check_window(context_length(out), gen_tokens, f"this decoder's context is too short for the check's {gen_tokens} tokens; convert it with --gen-tokens that fit (its own check ran then)")
    kind = quantized_kind(Path(out) / "model.onnx")
    if kind is None and opts.quant_thresholds.given():
        raise NormexportError(f"{', '.join(opts.quant_thresholds.given())} bound the quantized check, but {out} is not quantized", "drop the option (an fp32 decoder is checked token for token)")
    dtype = "float32" if kind else load.dtype or _decoder_dtype(decoder)
    hf = load_folder(path, dtype=dtype, trust_pickle=load.trust_pickle)
    if hf.task != "text-generation-with-past":
        raise NormexportError(f"{path} is not a causal LM ({hf.architecture}): there is no generation to check", "validate checks KV-cache decoders that `convert DIR` wrote")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if kind:
        from normexport.quant_check import check_quantized_decoder
        from normexport.stress import stress_check

        result = check_quantized_decoder(hf.module, decoder, gen_tokens, opts.seed, opts.quant_thresholds.resolved(kind))
        result.stress = stress_check(Path(out) / "model.onnx", None, opts, opts.seed)
        return result
    return check_generation(hf.module, decoder, dtype, gen_tokens, opts.seed, prompts=opts.samples, atol=opts.atol, rtol=opts.rtol)


def _decoder_dtype(decoder) -> str:
    kind = decoder.inputs[decoder.past_names[0]].type
    return {"tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}.get(kind, "float32")


def bench_folder(path: Path, out: Path, load, opts, prompt_len: int, new_tokens: int, rounds: int, others: tuple[Path, ...] = (), builder: str = "none") -> dict:
    """Interleaved rounds of transformers eager, the unfused export, OUTDIR's model and each of
    ``others`` (folders `convert DIR` wrote, e.g. fp32 beside int4) on normexport's onnxruntime
    loop; with ``builder`` (fp32/int4/int8, or auto: OUTDIR's precision) onnxruntime-genai's
    model builder makes its folder from DIR, and onnxruntime-genai runs it and OUTDIR."""
    import numpy as np
    import torch

    from normexport.fuse import save_onnx
    from normexport.hf.folder import load_folder
    from normexport.hf.generation import OnnxDecoder, check_length, torch_generate
    from normexport.hf.kv_export import export_decoder
    from normexport.hf.timing import folder_bytes, interleave, run_ort, run_torch
    from normexport.quantize import quantized_kind

    folders = [written_folder(out), *(written_folder(o) for o in others)]
    names = [f"onnx fused ({Path(f).name})" for f in folders]
    if len(set(names)) < len(names):
        raise NormexportError("two folders to time have the same name", "give folders with distinct names (the table names rows by folder)")
    threads = opts.threads or 1
    decoders = [OnnxDecoder(f, threads=threads, backend=opts.record) for f in folders]
    check_length(decoders[0], out, prompt_len, new_tokens)
    hf = load_folder(path, dtype=load.dtype, trust_pickle=load.trust_pickle)
    if hf.task != "text-generation-with-past":
        raise NormexportError(f"{path} is not a causal LM ({hf.architecture}): no prefill/decode to time", "bench DIR OUTDIR times KV-cache decoders that `convert DIR` wrote")
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="normexport-bench-"))
    notes = []
    try:
        save_onnx(export_decoder(hf).model, work / "unfused" / "model.onnx")
        unfused = OnnxDecoder(work / "unfused", threads=threads, backend=opts.record)
        vocab = hf.text_config.vocab_size
        prompt = np.random.default_rng(opts.seed).integers(min(3, vocab - 1), vocab, size=prompt_len).tolist()
        variants = {
            "torch eager (cache)": lambda: run_torch(hf.module, prompt, new_tokens),
            "onnx unfused": lambda: run_ort(unfused, prompt, new_tokens),
        }
        for name, d in zip(names, decoders):
            variants[name] = (lambda d: lambda: run_ort(d, prompt, new_tokens))(d)
        kinds = {name: quantized_kind(Path(f) / "model.onnx") for name, f in zip(names, folders)}
        sizes = {name: folder_bytes(f) for name, f in zip(names, folders)}
        sizes["onnx unfused"] = folder_bytes(work / "unfused")
        if builder != "none":
            precision = kinds[names[0]] or "fp32" if builder == "auto" else builder
            _add_builder(variants, kinds, sizes, notes, path, folders[0], precision, work, threads, prompt, new_tokens)
        timings = interleave(variants, rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for t in timings:
        t.quantized, t.size_bytes = kinds.get(t.name), sizes.get(t.name)
    reference = torch_generate(hf.module, prompt, new_tokens)
    if not opts.threads:
        notes.append("1 thread for PyTorch, onnxruntime and onnxruntime-genai by default (--threads N for more)")
    return {
        "model": str(path), "fused": str(out), "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "decode_past": f"{prompt_len}..{prompt_len + new_tokens - 2}", "rounds": rounds, "threads": threads, "backend": opts.backend,
        "variants": [t.to_json(reference) for t in timings], "notes": notes,
    }


BUILDER_PRECISIONS = ("fp32", "int4", "int8")


def _add_builder(variants, kinds, sizes, notes, path: Path, ours: Path, precision: str, work: Path, threads: int, prompt, new_tokens) -> None:
    """onnxruntime-genai's builder folder for DIR, and onnxruntime-genai running it and OUTDIR."""
    import subprocess
    import sys

    from normexport.hf.timing import folder_bytes, genai_view, run_genai

    try:
        import onnxruntime_genai as og
    except ImportError:
        notes.append("onnxruntime-genai is not installed: its builder's folder is not timed (pip install onnxruntime-genai)")
        return
    built = work / f"builder-{precision}"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(path), "-o", str(built), "-p", precision, "-e", "cpu", "-c", str(work / "builder-cache")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not (built / "genai_config.json").is_file():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
        notes.append(f"onnxruntime-genai's builder could not build {path} ({last}): its folder is not timed")
        return
    ours_name, builder_name = f"onnxruntime-genai, {ours.name}", f"onnxruntime-genai, builder {precision}"
    for name, folder in ((ours_name, ours), (builder_name, built)):
        model = og.Model(str(genai_view(folder, threads, work)))
        variants[name] = (lambda m: lambda: run_genai(og, m, prompt, new_tokens))(model)
    kinds[ours_name], kinds[builder_name] = kinds[f"onnx fused ({ours.name})"], None if precision == "fp32" else precision
    sizes[ours_name], sizes[builder_name] = folder_bytes(ours), folder_bytes(built)
    notes.append(f"builder: python -m onnxruntime_genai.models.builder -i {path} -p {precision} -e cpu (its defaults: block 32, accuracy level 4 for int4/int8 on CPU)")
