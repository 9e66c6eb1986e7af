"""Shared helpers of the CLI verbs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["open_model", "open_tokenizer", "echo_result"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def echo_result(message: str, as_json: bool) -> None:
    """A line meant for people: stdout, so ``lowrank ... > log`` keeps it; stderr when ``--json``
    owns stdout."""
    click.echo(message, err=as_json)


def open_tokenizer(directory: str) -> Any:
    """The tokenizer saved in ``directory``, or None when it has none."""
    from lowrank import CheckpointError

    if not any((Path(directory) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - a damaged tokenizer file fails in many ways
        raise CheckpointError(f"{directory}: the tokenizer cannot be loaded ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:300]})") from None


def open_model(name: str, device: str = "auto") -> tuple[Any, Any, Any]:
    """(model, tokenizer, device): a compressed or plain local directory, a bundled name or a hub id.

    The device is checked first (an explicit device that is not there fails before any loading);
    the tokenizer is None for a directory saved without one.
    """
    import torch

    import lowrank
    from lowrank.data import load_model

    dev, _ = lowrank.resolve_device(device)
    if Path(name).is_dir():
        model = lowrank.load(name, device="cpu")
        tokenizer = open_tokenizer(name)
    else:
        model, tokenizer = load_model(name, dtype=torch.float32)
    return model.to(dev).eval(), tokenizer, dev
