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
    from normexport.hf.kv_export import export_decoder, fresh_workdir, remove

    hf = load_folder(path, trust_pickle=trust_pickle)
    modules = [_module_json(name, m) for name, m in hf.module.named_modules() if name and type(m).__name__.endswith("RMSNorm")]
    result = {"model": str(path), "kind": f"huggingface ({hf.architecture})", "modules": modules, "norms": [], "near_misses": [], "notes": list(hf.notes)}
    work = fresh_workdir(Path(tempfile.gettempdir()))
    try:
        exp = export_decoder(hf, work)
    finally:
        remove(work)
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


def validate_folder(path: Path, out: Path, load, opts, gen_tokens: int) -> FolderValidation:
    """The generation check of OUTDIR's decoder against transformers on ``opts.samples``
    prompts, on ``opts.backend``; then each fused norm alone where ``opts.stress`` wants it."""
    from normexport.stress import stress_check, wanted

    generation = _check_folder_generation(path, out, load, opts, gen_tokens)
    model = written_folder(out) / "model.onnx"
    stress = stress_check(model, None, opts, opts.seed) if wanted(opts.stress, opts.dtype, model) else None
    return FolderValidation(generation, stress)


def _check_folder_generation(path: Path, out: Path, load, opts, gen_tokens: int):
    import torch

    from normexport.hf.folder import load_folder
    from normexport.hf.generation import OnnxDecoder, check_generation

    decoder = OnnxDecoder(written_folder(out), threads=opts.threads, backend=opts.record)
    dtype = load.dtype or _decoder_dtype(decoder)
    hf = load_folder(path, dtype=dtype, trust_pickle=load.trust_pickle)
    if hf.task != "text-generation-with-past":
        raise NormexportError(f"{path} is not a causal LM ({hf.architecture}): there is no generation to check", "validate checks KV-cache decoders that `convert DIR` wrote")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return check_generation(hf.module, decoder, dtype, gen_tokens, opts.seed, prompts=opts.samples, atol=opts.atol, rtol=opts.rtol)


def _decoder_dtype(decoder) -> str:
    kind = decoder.inputs[decoder.past_names[0]].type
    return {"tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}.get(kind, "float32")


def bench_folder(path: Path, out: Path, load, opts, prompt_len: int, new_tokens: int, rounds: int) -> dict:
    """Interleaved rounds of transformers eager, the unfused export and OUTDIR's model."""
    import numpy as np
    import torch

    from normexport.fuse import save_onnx
    from normexport.hf.folder import load_folder
    from normexport.hf.generation import OnnxDecoder, torch_generate
    from normexport.hf.kv_export import export_decoder
    from normexport.hf.timing import interleave, run_ort, run_torch

    from normexport.hf.generation import check_length

    fused = OnnxDecoder(written_folder(out), threads=opts.threads, backend=opts.record)
    check_length(fused, out, prompt_len, new_tokens)
    hf = load_folder(path, dtype=load.dtype, trust_pickle=load.trust_pickle)
    if hf.task != "text-generation-with-past":
        raise NormexportError(f"{path} is not a causal LM ({hf.architecture}): no prefill/decode to time", "bench DIR OUTDIR times KV-cache decoders that `convert DIR` wrote")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    work = Path(tempfile.mkdtemp(prefix="normexport-bench-"))
    try:
        save_onnx(export_decoder(hf, work).model, work / "unfused" / "model.onnx")
        unfused = OnnxDecoder(work / "unfused", threads=opts.threads, backend=opts.record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    vocab = hf.text_config.vocab_size
    prompt = np.random.default_rng(opts.seed).integers(min(3, vocab - 1), vocab, size=prompt_len).tolist()
    variants = {
        "torch eager (cache)": lambda: run_torch(hf.module, prompt, new_tokens),
        "onnx unfused": lambda: run_ort(unfused, prompt, new_tokens),
        f"onnx fused ({Path(out).name})": lambda: run_ort(fused, prompt, new_tokens),
    }
    timings = interleave(variants, rounds)
    reference = torch_generate(hf.module, prompt, new_tokens)
    return {
        "model": str(path), "fused": str(out), "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "decode_past": f"{prompt_len}..{prompt_len + new_tokens - 2}", "rounds": rounds, "threads": opts.threads or torch.get_num_threads(), "backend": opts.backend,
        "variants": [t.to_json(reference) for t in timings],
    }
