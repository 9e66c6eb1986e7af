"""``lowrank compress [MODEL]``: the main job.

With no argument it compresses the bundled SmolLM2-135M with the default recipe (whitening,
uniform, ratio 0.2), calibrates on Python's bundled documentation (always available), writes the
checkpoint to ``./smollm2-135m-lowrank-0.2`` and prints perplexity before and after on held-out
text.

Everything that can be checked without running the model -- the recipe, the device, the output
directory, then the model's blocks, targets and weights and the windows' length -- is checked
before the first forward pass (``lowrank.preflight``), so a bad input fails in seconds, not after
"perplexity before". Results go to stdout (``lowrank compress > log`` keeps them), progress bars
and the per-block log to stderr; with ``--json`` stdout holds only the JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import click

from ._common import echo_result
from .recipe import recipe_from

__all__ = ["compress_command", "DEFAULT_MODEL", "default_out"]

DEFAULT_MODEL = "smollm2-135m"


def default_out(model: str, ratio: float) -> Path:
    """``./<model name>-lowrank-<ratio>``: where the output goes without ``--out`` (never renamed:
    if it exists and is not empty the command refuses, like any ``--out``)."""
    return Path(Path(model.rstrip("/")).name + f"-lowrank-{ratio:g}")


@click.command("compress")
@click.argument("model", required=False, default=DEFAULT_MODEL)
@click.option("--out", "out", type=click.Path(file_okay=False),
              help="Output directory, new or empty; it appears only once everything is written. "
                   "Default: ./<MODEL name>-lowrank-<ratio> in the current directory (e.g. "
                   "./smollm2-135m-lowrank-0.2), refused like any --out if it exists and is not empty.")
@click.option("--recipe", "recipe_file", help="Recipe YAML file, or a preset's name (`lowrank recipe list`: "
                                               "svd-llm, asvd, zs-svd, aa-svd, recommended, ...).")
@click.option("--scaling", "scalings", multiple=True, help="Scaling name; repeat to stack (overrides the recipe).")
@click.option("--allocator", help="Allocator name (overrides the recipe).")
@click.option("--exporter", help="Exporter name (overrides the recipe).")
@click.option("--ratio", type=float, help="Fraction of the targeted parameters to remove (default 0.2).")
@click.option("--device", help="auto (CUDA when present, else the CPU), cpu, cuda or cuda:N (overrides the "
                                "recipe); an explicit device that is not there is an error.")
@click.option("--calib", "calib", default="pydoc", show_default=True, help="Calibration text source.")
@click.option("--calib-windows", default=32, show_default=True, help="Number of calibration windows.")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per window (at most the model's context).")
@click.option("--eval", "eval_source", default="pydoc", show_default=True, help="Held-out text for perplexity ('none' skips).")
@click.option("--eval-windows", default=None, type=int, help="Evaluation windows (default: all of the held-out text).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (the human-readable lines go to stderr).")
@click.option("--stream", is_flag=True,
              help="Never load the model whole: read each block from its safetensors shards when it is "
                   "compressed and write it at once (memory independent of the number of blocks; no "
                   "perplexity, run lowrank eval OUT). Implied under torchrun.")
@click.option("--resume", is_flag=True, help="With --stream: continue the interrupted run of the same arguments.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="With --stream: the dtype to compute in (default: the checkpoint's).")
@click.option("--offload", type=click.Choice(["bfloat16", "float16", "float32"]),
              help="With --stream: keep the calibration hidden states on disk (in the work directory) in "
                   "this dtype instead of in memory; float32 is exact.")
def compress_command(model: str, out: str | None, recipe_file: str | None, scalings: tuple[str, ...],
                     allocator: str | None, exporter: str | None, ratio: float | None, device: str | None,
                     calib: str, calib_windows: int, seqlen: int, eval_source: str, eval_windows: int | None,
                     batch_size: int, as_json: bool, stream: bool, resume: bool, dtype: str | None,
                     offload: str | None) -> None:
    """Compress MODEL (a local directory, a bundled name or a hub id; default smollm2-135m) and write
    it to --out (default ./<MODEL name>-lowrank-<ratio>)."""
    from lowrank import Recipe, check_output_directory, resolve_device

    base = recipe_from(recipe_file) if recipe_file else Recipe()
    overrides = {k: v for k, v in {
        "scalings": list(scalings) or None, "allocator": allocator, "exporter": exporter,
        "ratio": ratio, "device": device}.items() if v is not None}
    recipe = dataclasses.replace(base, **overrides) if overrides else base
    resolve_device(recipe.device)  # an explicit device that is not there fails now, not later
    out_dir = Path(out) if out else default_out(model, recipe.ratio)
    check_output_directory(out_dir)  # fail before the slow part, not after it
    if offload and not (stream or resume or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise click.UsageError("--offload keeps hidden states in a streamed run's work directory: add --stream")
    if stream or resume or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .stream import run_streamed

        result = run_streamed(model, recipe, out_dir, calib, calib_windows, seqlen, batch_size, resume, dtype,
                              lambda msg: echo_result(msg, as_json), offload=offload)
    else:
        result = _run(model, recipe, out_dir, calib, calib_windows, seqlen, eval_source, eval_windows,
                      batch_size, as_json)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, process 0 speaks
    if as_json:
        click.echo(json.dumps(result, indent=2))


def _run(model_name: str, recipe, out_dir: Path, calib: str, calib_windows: int, seqlen: int,
         eval_source: str, eval_windows: int | None, batch_size: int, as_json: bool) -> dict:
    import torch

    from lowrank import compress, preflight, resolve_device, save
    from lowrank.data import load_model, load_windows, perplexity

    def echo(msg: str) -> None:
        echo_result(msg, as_json)

    echo(recipe.summary())
    model, tokenizer = load_model(model_name, dtype=torch.float32)
    calibration = load_windows(tokenizer, calib, "calibration", calib_windows, seqlen, seed=recipe.seed)
    evaluation = None
    if eval_source.lower() != "none":
        evaluation = load_windows(tokenizer, eval_source, "evaluation", eval_windows, seqlen)
    preflight(model, recipe, calibration)  # blocks, targets, weights, windows: before any forward pass
    device, _ = resolve_device(recipe.device)
    result: dict = {"model": model_name, "out": str(out_dir), "recipe": recipe.to_dict()}
    if evaluation is not None:
        before = perplexity(model, evaluation, batch_size=batch_size, device=device, progress=not as_json)
        result["perplexity_before"] = before.perplexity
        echo(f"perplexity before: {before.perplexity:.3f} ({eval_source}, {before.tokens} tokens)")
    report = compress(model, recipe, calibration, batch_size=batch_size)
    echo(report.summary())
    if evaluation is not None:
        after = perplexity(model, evaluation, batch_size=batch_size, device=device, progress=not as_json)
        result["perplexity_after"] = after.perplexity
        echo(f"perplexity after:  {after.perplexity:.3f}")
    save(model, out_dir, tokenizer=tokenizer)
    echo(f"wrote {out_dir}")
    result.update(ratio_achieved=report.ratio_achieved, model_params_before=report.model_params_before,
                  model_params_after=report.model_params_after, timings=report.timings)
    return result
