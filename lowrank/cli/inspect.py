"""``lowrank inspect MODEL_OR_DIR``: per-matrix shapes, ranks, parameters and spectra."""

from __future__ import annotations

import json

import click

__all__ = ["inspect_command"]


@click.command("inspect")
@click.argument("model")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="Write a PNG of the spectra and ranks.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.option("--diagnostics", "show_diagnostics", is_flag=True,
              help="Under each matrix, the numbers its scalings and allocator reported (e.g. soco.outside_prefix).")
def inspect_command(model: str, plot_file: str | None, as_json: bool, show_diagnostics: bool) -> None:
    """Table of every targeted matrix: shape, rank, parameters, effective rank of its spectrum (and,
    for a model compressed with a learned scaling, the effective ranks before and after learning;
    with --diagnostics, what each strategy reported about it, such as SoCo's learned ranks and scales)."""
    from lowrank import inspect_model, plot_inspection

    from ._common import open_model

    net, _tok, _dev = open_model(model, "cpu")
    rows = inspect_model(net)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        learned = any(r.effective_rank_before is not None for r in rows)  # a learned scaling's report
        extra = f" {'erank before':>12} {'erank after':>11} {'PR before':>9} {'PR after':>8}" if learned else ""
        click.echo(f"{'matrix':<44} {'shape':>11} {'rank':>6} {'params':>10} {'eff.rank':>9} {'PR':>8}{extra}")

        def num(v: float | None, width: int) -> str:
            return f"{v:>{width}.1f}" if v is not None else f"{'-':>{width}}"

        for r in rows:
            rank = "dense" if r.rank is None else str(r.rank)
            extra = (f" {num(r.effective_rank_before, 12)} {num(r.effective_rank_after, 11)} "
                     f"{num(r.participation_ratio_before, 9)} {num(r.participation_ratio_after, 8)}") if learned else ""
            click.echo(f"{r.name:<44} {r.shape[0]:>5}x{r.shape[1]:<5} {rank:>6} {r.params:>10,} "
                       f"{r.effective_rank:>9.1f} {r.participation_ratio:>8.1f}{extra}")
            if show_diagnostics and r.diagnostics:
                click.echo("    " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(r.diagnostics.items())))
        total = sum(r.params for r in rows)
        dense = sum(r.shape[0] * r.shape[1] for r in rows)
        click.echo(f"{len(rows)} matrices, {total:,} parameters ({dense:,} dense; {1 - total / dense:.4f} removed)")
    if plot_file:
        plot_inspection(rows, plot_file, title=model)
        click.echo(f"wrote {plot_file}", err=as_json)
