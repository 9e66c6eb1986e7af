"""``lowrank compress [MODEL]``: the main job.

With no argument it compresses the bundled SmolLM2-135M with the default recipe (whitening,
uniform, ratio 0.2), calibrates on Python's bundled documentation (always available), writes the
checkpoint and prints perplexity before and after on held-out text.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

__all__ = ["compress_command", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m"


def _default_out(model: str, ratio: float) -> Path:
    """``./<model>-lowrank-<ratio>``, numbered if taken (only the default is ever renamed)."""
    stem = Path(model.rstrip("/")).name + f"-lowrank-{ratio:g}"
    out, i = Path(stem), 2
    while out.exists():
        out, i = Path(f"{stem}-{i}"), i + 1
    return out


@click.command("compress")
@click.argument("model", required=False, default=DEFAULT_MODEL)
@click.option("--out", "out", type=click.Path(file_okay=False), help="Output directory (new or empty).")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False, exists=True), help="Recipe YAML file.")
@click.option("--scaling", "scalings", multiple=True, help="Scaling name; repeat to stack (overrides the recipe).")
@click.option("--allocator", help="Allocator name (overrides the recipe).")
@click.option("--exporter", help="Exporter name (overrides the recipe).")
@click.option("--ratio", type=float, help="Fraction of the targeted parameters to remove (default 0.2).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (overrides the recipe).")
@click.option("--calib", "calib", default="pydoc", show_default=True, help="Calibration text source.")
@click.option("--calib-windows", default=32, show_default=True, help="Number of calibration windows.")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per window.")
@click.option("--eval", "eval_source", default="pydoc", show_default=True, help="Held-out text for perplexity ('none' skips).")
@click.option("--eval-windows", default=None, type=int, help="Evaluation windows (default: all of the held-out text).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def compress_command(model: str, out: str | None, recipe_file: str | None, scalings: tuple[str, ...],
                     allocator: str | None, exporter: str | None, ratio: float | None, device: str | None,
                     calib: str, calib_windows: int, seqlen: int, eval_source: str, eval_windows: int | None,
                     batch_size: int, as_json: bool) -> None:
    """Compress MODEL (a local directory, a bundled name or a hub id; default smollm2-135m)."""
    import dataclasses

    from lowrank import LowrankError, Recipe, check_output_directory

    try:
        base = Recipe.load(recipe_file) if recipe_file else Recipe()
        overrides = {k: v for k, v in {
            "scalings": list(scalings) or None, "allocator": allocator, "exporter": exporter,
            "ratio": ratio, "device": device}.items() if v is not None}
        recipe = dataclasses.replace(base, **overrides) if overrides else base
        out_dir = Path(out) if out else _default_out(model, recipe.ratio)
        check_output_directory(out_dir)  # fail before the slow part, not after it
        result = _run(model, recipe, out_dir, calib, calib_windows, seqlen, eval_source, eval_windows, batch_size)
    except (LowrankError, ValueError, FileNotFoundError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2))


def _run(model_name: str, recipe, out_dir: Path, calib: str, calib_windows: int, seqlen: int,
         eval_source: str, eval_windows: int, batch_size: int) -> dict:
    import torch

    from lowrank import compress, resolve_device, save
    from lowrank.data import load_model, load_windows, perplexity

    echo = lambda msg: click.echo(msg, err=True)  # noqa: E731  (results on stderr; --json on stdout)
    echo(recipe.summary())
    model, tokenizer = load_model(model_name, dtype=torch.float32)
    calibration = load_windows(tokenizer, calib, "calibration", calib_windows, seqlen, seed=recipe.seed)
    device, _ = resolve_device(recipe.device)
    evaluation = None
    result: dict = {"model": model_name, "out": str(out_dir), "recipe": recipe.to_dict()}
    if eval_source.lower() != "none":
        evaluation = load_windows(tokenizer, eval_source, "evaluation", eval_windows, seqlen)
        before = perplexity(model, evaluation, batch_size=batch_size, device=device)
        result["perplexity_before"] = before.perplexity
        echo(f"perplexity before: {before.perplexity:.3f} ({eval_source}, {before.tokens} tokens)")
    report = compress(model, recipe, calibration, batch_size=batch_size)
    echo(report.summary())
    if evaluation is not None:
        after = perplexity(model, evaluation, batch_size=batch_size, device=device)
        result["perplexity_after"] = after.perplexity
        echo(f"perplexity after:  {after.perplexity:.3f}")
    save(model, out_dir, tokenizer=tokenizer)
    echo(f"wrote {out_dir}")
    result.update(ratio_achieved=report.ratio_achieved, model_params_before=report.model_params_before,
                  model_params_after=report.model_params_after, timings=report.timings)
    return result
