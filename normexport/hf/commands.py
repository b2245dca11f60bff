"""The CLI's Hugging Face parts: the folder branch of `convert`, and `generate`."""

from __future__ import annotations

from pathlib import Path

import click

from normexport.errors import NormexportError
from normexport.hf import ATTENTION_CHOICES
from normexport.hf.folder import TASKS


_TIMES_NOTHING = "convert times nothing for a folder: `normexport bench DIR OUTDIR` times prefill and decode (--prompt-len, --new-tokens, --rounds)"
_MODEL_FILE = "the folder's config.json defines the model and its inputs"

# How each option of `convert`, `validate` and `bench` acts on a Hugging Face folder. An option
# under FOLDER_REFUSES is exit 2 when given with a folder, with the reason; every other option of
# the command is listed under FOLDER_ACTS with what it does there (tests/test_hf.py walks the
# commands' options and holds each to one of the two).
FOLDER_ACTS = {
    "convert": {
        "model": "the folder", "output": "OUTDIR", "target": "the fused norms' op", "residual": "the residual layout", "no_residual": "the residual layout",
        "trust_pickle": "pickled (.bin) weights in the folder", "dtype": "the dtype transformers loads and exports in",
        "seed": "the prompts' token ids", "threads": "onnxruntime's and PyTorch's threads", "atol": "the tolerance of every compared output",
        "rtol": "the tolerance of every compared output", "samples": "prompts (outputs without a cache: draws) checked",
        "stress": "each fused norm alone on --backend", "backend": "where the generation check and the stress check run",
        "no_validate": "skips the generation check", "no_bench": "nothing is timed (as without it)", "keep_failed": "writes OUTDIR when the check fails",
        "report_path": "the report", "force": "replaces a report normexport did not write", "task": "what is exported", "gen_tokens": "tokens checked per prompt",
        "attention_fusion": "onnxruntime's attention fusions", "trust_remote_code": "the folder's modeling code",
        "attention": "GroupQueryAttention or the generic attention graph", "all_logits": "the decoder's logits: every position",
        "quantize": "the decoder's weight MatMuls quantized after the fusion", "quant_block_size": "the quantizer's block",
        "quant_accuracy_level": "MatMulNBits' accuracy level", "quantize_lm_head": "whether the logits' MatMul is quantized",
        "quantize_embeddings": "whether the embedding table is quantized", "min_top1": "the quantized check's bound",
        "min_top5": "the quantized check's bound", "max_kl": "the quantized check's bound", "min_cosine": "the quantized check's bound",
    },
    "validate": {
        "model": "the folder", "fused": "OUTDIR", "trust_pickle": "pickled (.bin) weights in the folder", "dtype": "the dtype transformers loads in",
        "seed": "the prompts' token ids", "threads": "onnxruntime's and PyTorch's threads", "atol": "the tolerance of the compared logits",
        "rtol": "the tolerance of the compared logits", "samples": "prompts checked", "stress": "each fused norm of OUTDIR alone on --backend",
        "backend": "where the decoder runs", "report_path": "the report", "force": "replaces a report normexport did not write",
        "min_top1": "the quantized check's bound", "min_top5": "the quantized check's bound", "max_kl": "the quantized check's bound",
        "min_cosine": "the quantized check's bound",
    },
    "bench": {
        "model": "the folder", "fused": "OUTDIR", "trust_pickle": "pickled (.bin) weights in the folder", "dtype": "the dtype transformers loads in",
        "seed": "the prompt's token ids", "threads": "onnxruntime's and PyTorch's threads", "backend": "where the decoders run",
        "report_path": "the report", "force": "replaces a report normexport did not write",
        "prompt_len": "prompt tokens of the prefill", "new_tokens": "decode steps timed", "rounds": "interleaved rounds",
        "others": "more folders timed beside OUTDIR", "builder": "onnxruntime-genai's builder's folder timed beside it",
    },
}
FOLDER_REFUSES = {
    "convert": {"opset": "the decoder is exported at the opset its KV contract needs", "exporter": "the dynamo exporter exports the decoder",
                "inputs": _MODEL_FILE, "factory": _MODEL_FILE, "warmup": _TIMES_NOTHING, "iters": _TIMES_NOTHING},
    "validate": {"unfused": "validate DIR OUTDIR checks OUTDIR's generation against transformers", "inputs": _MODEL_FILE, "factory": _MODEL_FILE},
    "bench": {"unfused": "bench DIR OUTDIR exports the unfused decoder itself", "inputs": _MODEL_FILE, "factory": _MODEL_FILE,
              "plot": "the folder's table has no chart", "warmup": "a folder is timed in --rounds of prefill and decode",
              "iters": "a folder is timed in --rounds of prefill and decode"},
}


def refuse_for_folder(command: str) -> None:
    """The options of ``command`` given on the command line that do not apply to a Hugging Face
    folder: exit 2 naming them and why, before any work."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = [p for p in ctx.command.params if p.name in FOLDER_REFUSES[command]
             and ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    if given:
        p = given[0]
        flag = max(p.opts, key=len) if p.opts else p.name
        raise NormexportError(f"{flag} does not apply to a Hugging Face folder: {FOLDER_REFUSES[command][p.name]}", "drop the option")


def hf_convert_options(fn):
    for deco in reversed(
        [
            click.option("--task", type=click.Choice(TASKS), help="Hugging Face folders: what to export (default: text-generation-with-past for *ForCausalLM, else feature-extraction)."),
            click.option("--gen-tokens", type=click.IntRange(1, 4096), default=32, show_default=True, help="Hugging Face folders: greedy tokens generated per prompt to check against transformers."),
            click.option("--attention-fusion/--no-attention-fusion", default=None, help="Hugging Face folders: after the norms, fuse rotary embeddings and attention into onnxruntime's ops (RotaryEmbedding, MultiHeadAttention/GroupQueryAttention where faster on CPU) [default: on for --target ort]."),
            click.option("--attention", type=click.Choice(ATTENTION_CHOICES), default="auto", show_default=True, help="Hugging Face folders, --target ort: gqa exports each layer's attention as one onnxruntime GroupQueryAttention (rotary inside, positions from attention_mask; no position_ids input, unpadded or right-padded rows) and refuses a model it does not fit; generic keeps the attention as plain ops (any runtime, left padding, explicit position_ids); auto: gqa where the model fits (Llama, Qwen2, Mistral), else generic with the reason in the report."),
            click.option("--all-logits", is_flag=True, help="Hugging Face folders, decoders with a KV cache: output the logits of every position ([batch, sequence, vocab]; scoring, perplexity). By default only each row's last token's ([batch, 1, vocab]), all that generation reads: the prefill runs the LM head once per row, not once per prompt token."),
            click.option("--trust-remote-code", is_flag=True, help="Hugging Face folders: allow custom modeling code (auto_map in config.json). It runs Python from the folder."),
        ]
    ):
        fn = deco(fn)
    return fn


def convert_hf(model: Path, opts, hf: dict, report_path: Path | None, progress):
    """convert for a folder: print the report, write the JSON; the report is returned (the CLI
    exits 1 when generation differs)."""
    from normexport import report
    from normexport.hf.convert import HFOptions, convert_folder
    from normexport.hf.show import print_hf_convert

    hf_opts = HFOptions(task=hf.get("task"), gen_tokens=hf.get("gen_tokens") or 32, trust_remote_code=bool(hf.get("trust_remote_code")), attention_fusion=hf.get("attention_fusion"), attention=hf.get("attention") or "auto", all_logits=bool(hf.get("all_logits")))
    result = convert_folder(model, opts, hf_opts, progress=progress)
    print_hf_convert(report.console(), result)
    if report_path:
        report.write_json(result.to_json(), report_path)
    return result


def _parse_ids(ctx, param, value):
    try:
        ids = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of token ids (e.g. 1,2,3)") from None
    if not ids or any(i < 0 for i in ids):
        raise click.BadParameter("give at least one token id, none negative (e.g. 1,2,3)")
    return ids


@click.command("generate")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt-ids", required=True, callback=_parse_ids, metavar="ID,ID,...", help="The prompt as token ids.")
@click.option("--max-new-tokens", type=click.IntRange(1, 100000), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), help="onnxruntime intra-op threads.")
@click.option("--ignore-eos", is_flag=True, help="Generate all --max-new-tokens tokens, past the model's EOS.")
@click.option("--json", "as_json", is_flag=True, help="Print the tokens as JSON.")
def generate_command(folder, prompt_ids, max_new_tokens, threads, ignore_eos, as_json):
    """Greedy generation (argmax of the logits) with the decoder `normexport convert` wrote to
    FOLDER (onnxruntime, KV cache); it stops after the EOS token named in FOLDER's genai_config.json."""
    import json
    import time

    from normexport.hf.generation import OnnxDecoder, folder_eos_ids

    from normexport.hf.generation import check_length

    decoder = OnnxDecoder(folder, threads=threads)
    vocab = decoder.session.get_outputs()[0].shape[-1]
    if isinstance(vocab, int) and max(prompt_ids) >= vocab:
        raise NormexportError(f"token id {max(prompt_ids)} is outside the vocabulary (size {vocab})", f"give ids below {vocab}")
    check_length(decoder, folder, len(prompt_ids), max_new_tokens)
    start = time.perf_counter()
    tokens, _ = decoder.generate(prompt_ids, max_new_tokens, eos=frozenset() if ignore_eos else folder_eos_ids(folder))
    seconds = time.perf_counter() - start
    if as_json:
        click.echo(json.dumps({"prompt_ids": prompt_ids, "new_tokens": tokens, "seconds": round(seconds, 4)}))
    else:
        click.echo(",".join(map(str, tokens)))


def hf_bench_options(fn):
    for deco in reversed(
        [
            click.option("--prompt-len", type=click.IntRange(1, 100000), default=64, show_default=True, help="Hugging Face folders: prompt tokens of the timed prefill."),
            click.option("--new-tokens", type=click.IntRange(2, 100000), default=16, show_default=True, help="Hugging Face folders: tokens generated after it (decode ms/token is their mean, past from the prompt length on)."),
            click.option("--rounds", type=click.IntRange(1, 10000), default=5, show_default=True, help="Hugging Face folders: interleaved rounds (medians reported)."),
            click.option("--with", "others", multiple=True, type=click.Path(path_type=Path), help="Hugging Face folders: another folder `convert DIR` wrote to time beside OUTDIR (e.g. the fp32 one beside --quantize int4's; repeatable)."),
            click.option("--builder", type=click.Choice(("none", "auto", "fp32", "int4", "int8")), default="none", show_default=True, help="Hugging Face folders: also build DIR with onnxruntime-genai's model builder at this precision (auto: OUTDIR's) and time it and OUTDIR on onnxruntime-genai (needs onnxruntime-genai)."),
        ]
    ):
        fn = deco(fn)
    return fn


def validate_hf(model: Path, fused: Path, load, opts, report_path: Path | None):
    """validate DIR OUTDIR: the generation check, and the stress check where wanted (the CLI
    exits 1 when either fails)."""
    from normexport import report
    from normexport.hf.show import print_generation
    from normexport.hf.tools import validate_folder
    from normexport.report import print_stress

    result = validate_folder(model, fused, load, opts, gen_tokens=32)
    if hasattr(result, "thresholds"):  # the quantized check
        from normexport.quant_check import print_quantized

        print_quantized(report.console(), None, result)
        if report_path:
            report.write_json({"model": str(model), "fused": str(fused), "quantized_accuracy": result.to_json()}, report_path)
        return result
    c = report.console()
    print_generation(c, result.generation)
    print_stress(c, result.stress)
    if report_path:
        report.write_json({"model": str(model), "fused": str(fused), **result.to_json()}, report_path)
    return result


def bench_hf(model: Path, fused: Path, load, opts, report_path: Path | None, hf: dict) -> None:
    """bench DIR OUTDIR: prefill and decode latency table."""
    from rich.markup import escape
    from rich.table import Table

    from normexport import report
    from normexport.hf.tools import bench_folder

    result = bench_folder(model, fused, load, opts, hf["prompt_len"], hf["new_tokens"], hf["rounds"], tuple(hf.get("others") or ()), hf.get("builder") or "none")
    t = Table(title=f"{escape(str(model))}: prefill of {result['prompt_tokens']} tokens, decode with past {result['decode_past']}, {result['backend']}, {result['threads']} thread(s), median of {result['rounds']} rounds")
    for col in ("variant", "prefill ms", "decode ms/token", "model MB", "greedy tokens = transformers"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v in result["variants"]:
        if v["tokens_equal_reference"]:
            same = "yes"
        else:
            same = f"no ({v['quantized']}: see the quantized check)" if v.get("quantized") else "[red]no[/red]"
        size = f"{v['size_mb']:.1f}" if "size_mb" in v else "-"
        t.add_row(escape(v["variant"]), f"{v['prefill_ms']:.2f}", f"{v['decode_ms_per_token']:.3f}", size, same)
    c = report.console()
    c.print(t)
    for note in result["notes"]:
        c.print(f"[dim]note: {note}[/dim]")
    if report_path:
        report.write_json(result, report_path)


_DEFAULTS = {"task": None, "gen_tokens": 32, "attention_fusion": None, "attention": "auto", "all_logits": False, "trust_remote_code": False, "prompt_len": 64, "new_tokens": 16, "rounds": 5, "others": (), "builder": "none"}


_FLAGS = {"attention_fusion": "--attention-fusion/--no-attention-fusion", "others": "--with"}


def refuse_folder_options(hf: dict) -> None:
    """Options only a Hugging Face folder takes, given with a model file: exit 2, not ignored."""
    given = [_FLAGS.get(k, "--" + k.replace("_", "-")) for k, v in hf.items() if v != _DEFAULTS.get(k, v)]
    if given:
        raise NormexportError(f"{', '.join(given)} applies to Hugging Face folders only", "drop the option, or pass a folder with config.json and safetensors weights")
