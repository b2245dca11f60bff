"""``normexport ln2rms MODEL -o OUT``: the click command over ``normexport.ln2rms.ln2rms``."""

from __future__ import annotations

import sys
from pathlib import Path

from typing import TYPE_CHECKING

import click

from normexport.errors import NormexportError, ValidationFailed

if TYPE_CHECKING:
    from torch import nn

    from normexport.ln2rms.rewrite import Ln2RmsReport


def _load_for_cli(model_path: str, factory: str | None, trust_pickle: bool) -> tuple[nn.Module, dict]:
    import torch
    from torch import nn

    from normexport import load

    lm = load.load_model(model_path, factory=factory, trust_pickle=trust_pickle)
    if lm.kind in ("torchscript", "export"):
        raise NormexportError(
            f"{model_path} is a {'TorchScript' if lm.kind == 'torchscript' else 'torch.export'} archive: "
            "it has no nn.LayerNorm modules to replace",
            "give the nn.Module: its state_dict with --factory MODULE:FUNCTION, or a trusted pickle",
        )
    module = lm.module
    example = None
    if lm.input_specs:
        example = load.make_inputs(lm.input_specs, seed=0)
    if example is None:
        emb = next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
        names = lm.input_names or ["input_ids"]
        if emb is None or len(names) != 1:
            raise NormexportError(
                f"no example inputs are known for {model_path}",
                "use a factory that returns (module, {'input_ids': tensor})",
            )
        gen = torch.Generator().manual_seed(0)
        example = {names[0]: torch.randint(0, emb.num_embeddings, (1, 16), generator=gen)}
    return module, example


def _print_table(report: Ln2RmsReport, facts: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from normexport.report import console

    t = Table(title="ln2rms: Pre-LN -> Pre-RMSNorm", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("blocks converted", str(report.blocks_converted))
    t.add_row("residual branches recentred", str(report.residual_branches))
    t.add_row("LayerNorms -> RMSNorm", str(report.layer_norms_replaced))
    t.add_row("affines folded", str(report.folded))
    t.add_row("embeddings recentred", str(report.embeddings_recentered))
    t.add_row("head untied", "yes" if report.head_untied else "no")
    t.add_row("max abs / max rel", f"{report.max_abs:.3g} / {report.max_rel:.3g} ({report.samples} draws)")
    t.add_row("equivalent", "[green]yes[/green]" if report.passed else "[red]NO[/red]")
    if facts.get("output"):
        t.add_row("written", escape(f"{facts['output']} (dynamic: {', '.join(facts['dynamic_dims']) or 'none'})"))
    c = console()
    c.print(t)
    for note in report.notes:
        c.print(f"note: {escape(note)}")


@click.command("ln2rms")
@click.argument("model", type=click.Path())  # normexport.load refuses anything but a regular file
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Where to write the converted model (torch.export .pt2 archive).")
@click.option("--factory", default=None, help="MODULE:FUNCTION that builds the module (for a state_dict MODEL).")
@click.option("--fold-affine", is_flag=True, help="Fold each norm's gain and bias into the linear layers it feeds, where all its consumers are linear.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False), help="Write the conversion report as JSON.")
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling a whole pickled module, or .pt2 members that need more than tensors (runs code from the file).")
@click.option("--force", is_flag=True, help="Replace an existing file at -o / --report that normexport did not write. Never an input.")
def ln2rms_command(model, output, factory, fold_affine, report_path, trust_pickle, force):
    """Convert a Pre-LN transformer into an equivalent Pre-RMSNorm one (Jiang et al. 2023)."""
    from normexport.outputs import Output, check

    try:
        from normexport.factory import factory_source

        reads = [model, factory_source(factory)]  # the factory's file, however --factory names it
        check(reads, [Output("-o", Path(output), "pt2"), Output("--report", report_path and Path(report_path), "report")], force)
        module, example = _load_for_cli(model, factory, trust_pickle)
        _convert_and_write(module, example, {"model": model, "output": output, "fold_affine": fold_affine}, report_path)
    except NormexportError as e:
        if click.get_current_context().parent is not None:
            raise  # under `normexport`: the top-level handler prints it (and honours --debug)
        click.echo(f"error: {e.message}", err=True)  # standalone: same two lines, exit 2
        if e.hint:
            click.echo(f"hint: {e.hint}", err=True)
        sys.exit(e.exit_code)


def _convert_and_write(module: nn.Module, example: dict, payload: dict, report_path: str | None) -> None:
    """Convert, write the checked archive and the report; a failed check writes no archive (exit 1)."""
    from normexport.ln2rms.archive import export_archive
    from normexport.ln2rms.convert import ln2rms
    from normexport.ln2rms.equivalence import random_inputs
    from normexport.report import write_json

    try:
        converted, report = ln2rms(module, example, fold_affine=payload["fold_affine"])
        draws = [random_inputs(example, report.index_ranges, 1000 + i) for i in range(2)]
        facts = export_archive(converted, example, payload["output"], check_inputs=[example] + draws)
    except ValidationFailed as e:  # nothing is written: exit 1 with the numbers
        if report_path and e.report is not None:
            write_json({**payload, "output": None, **e.report.to_dict()}, report_path)
        if e.report is not None:
            _print_table(e.report, {})
        click.echo(f"error: {e}", err=True)
        sys.exit(ValidationFailed.exit_code)
    payload.update(report.to_dict())
    payload.update(facts)
    if report_path:
        write_json(payload, report_path)
    _print_table(report, facts)
