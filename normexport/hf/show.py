"""Terminal tables for a folder conversion and its generation check."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from normexport.report import _fmt, print_fusion, print_stress


def print_generation(c: Console, g) -> None:
    t = Table(title=f"Generation vs transformers ({g.dtype}, up to {g.new_tokens} new tokens, greedy argmax, stop at EOS; logits atol {_fmt(g.atol)} rtol {_fmt(g.rtol)})")
    for col in ("prompt", "step", "max abs", "max rel", "cosine", "logits", "tokens"):
        t.add_column(col, justify="right" if col not in ("tokens", "logits") else "left")
    eos = set(g.eos_token_ids)
    for i, p in enumerate(g.prompts):
        worst = max(p.steps[1:], key=lambda s: (not s.passed, s.max_abs if s.max_abs == s.max_abs else float("inf")), default=None)
        if p.first_difference is None:
            ended = f", EOS at step {len(p.torch_tokens) - 1}" if p.torch_tokens and p.torch_tokens[-1] in eos else ""
            tokens = f"[green]equal[/green] ({len(p.torch_tokens)}{ended})"
        else:
            verdict = "near-tie, tolerated" if p.tolerated else "[red]FAIL[/red]"
            tokens = f"first differs at step {p.first_difference} (top-2 margin {_fmt(p.margin)}: {verdict})"
        t.add_row(str(i), "prefill", _fmt(p.steps[0].max_abs), _fmt(p.steps[0].max_rel), _cos(p.steps[0].cosine), _ok(p.steps[0]), tokens)
        if worst is not None:
            t.add_row("", f"worst decode ({worst.step})", _fmt(worst.max_abs), _fmt(worst.max_rel), _cos(worst.cosine), _ok(worst), "")
    c.print(t)
    for line in g.failures():
        c.print(f"[red]{escape(line)}[/red]")
    for note in g.notes:
        c.print(f"[dim]note: {escape(note)}[/dim]")
    c.print("generation: " + ("[green]PASSED[/green]" if g.passed else "[red]FAILED[/red]"))


def _ok(step) -> str:
    return "[green]ok[/green]" if step.passed else "[red]FAIL[/red]"


def _cos(v: float) -> str:
    return f"{v:.6f}" if v == v else "nan"


def print_hf_convert(c: Console, r) -> None:
    c.print(f"[bold]{escape(r.model)}[/bold] (Hugging Face folder, {escape(r.architecture)}) -> task {escape(r.task)}, dynamic batch/sequence/past")
    c.print(escape("inputs: " + ", ".join(_abbrev(r.inputs)) + "; outputs: " + ", ".join(_abbrev(r.output_names))))
    if r.fusion:
        print_fusion(c, r.fusion)
        c.print(f"RMSNorm modules in PyTorch: {r.rmsnorm_modules}; fused norms: {r.fusion.fused}")
    if r.attention_op == "GroupQueryAttention":
        c.print("attention: one GroupQueryAttention per layer (rotary inside, positions from attention_mask; no position_ids input)")
    if r.attention is not None:
        c.print(f"attention/rotary fusions: {escape(r.attention.summary())}")
    if r.generation is not None:
        print_generation(c, r.generation)
    if r.stress is not None:
        print_stress(c, r.stress)
    if r.quantization is not None:
        from normexport.quant_check import print_quantized

        print_quantized(c, r.quantization, r.quantized_accuracy)
    for o in r.outputs:
        c.print(f"{escape(o.name)} (sample {o.sample}): max abs {_fmt(o.max_abs)}, cosine {o.cosine:.6f}: " + ("[green]passed[/green]" if o.passed else "[red]FAILED[/red]"))
    for note in r.notes:
        c.print(f"[dim]note: {escape(note)}[/dim]")
    c.print("[dim]" + ", ".join(f"{k} {v:.1f}s" for k, v in r.steps.items()) + "[/dim]")
    if r.written:
        c.print(f"wrote [bold]{escape(str(r.output))}[/bold]")


def _abbrev(names: list[str]) -> list[str]:
    """past_key_values.0.key ... past_key_values.N.value -> one entry."""
    plain = [n for n in names if not n.startswith(("past_key_values.", "present."))]
    for prefix in ("past_key_values", "present"):
        layers = {n.split(".")[1] for n in names if n.startswith(prefix + ".")}
        if layers:
            plain.append(f"{prefix}.{{0..{len(layers) - 1}}}.key/value")
    return plain
