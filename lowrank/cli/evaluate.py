"""``lowrank eval MODEL``: perplexity on held-out windows."""

from __future__ import annotations

import json
import time

import click

__all__ = ["eval_command"]


@click.command("eval")
@click.argument("model")
@click.option("--data", default="pydoc", show_default=True, help="Text source (pydoc, austen:<novel>, file:<path>, hf:..., wikitext2).")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per window (at most the model's context).")
@click.option("--windows", default=None, type=int, help="Evaluate the first K windows (default: all).")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present, else the CPU), cpu, cuda or cuda:N; an explicit device that "
                   "is not there is an error.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(model: str, data: str, seqlen: int, windows: int | None, batch_size: int, device: str, as_json: bool) -> None:
    """Perplexity of MODEL (bundled name, hub id, or a directory, compressed or not).

    The result goes to stdout; the progress bar to stderr. Nothing is written.
    """
    from lowrank import CheckpointError, count_parameters
    from lowrank.data import load_windows, perplexity

    from ._common import open_model

    start = time.perf_counter()
    net, tokenizer, dev = open_model(model, device)
    if tokenizer is None:
        raise CheckpointError(f"{model} has no tokenizer (tokenizer.json / tokenizer_config.json), which "
                              "eval needs to cut the text into tokens; save the model with its tokenizer "
                              "(lowrank.save(model, directory, tokenizer=tokenizer))")
    ids = load_windows(tokenizer, data, "evaluation", windows, seqlen)
    result = perplexity(net, ids, batch_size=batch_size, device=dev, progress=not as_json)
    out = {
        "model": model, "data": data, "perplexity": result.perplexity, "nll": result.nll,
        "finite": result.finite, "tokens": result.tokens, "windows": int(ids.shape[0]), "seqlen": seqlen,
        "parameters": count_parameters(net), "seconds": result.seconds,
        "total_seconds": time.perf_counter() - start, "device": str(dev),
    }
    if as_json:
        click.echo(json.dumps(out))
    else:
        state = "" if result.finite else " (NOT FINITE)"
        click.echo(f"{model}: perplexity {result.perplexity:.4f}{state} over {result.tokens} tokens "
                   f"({ids.shape[0]} x {seqlen}, {data}); {out['parameters']:,} parameters; {result.seconds:.1f}s")
