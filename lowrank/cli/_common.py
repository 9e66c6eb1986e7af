"""Shared helpers of the CLI verbs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["open_model"]


def open_model(name: str, device: str = "auto") -> tuple[Any, Any, Any]:
    """(model, tokenizer, device): a compressed or plain local directory, a bundled name or a hub id."""
    import torch
    from transformers import AutoTokenizer

    import lowrank
    from lowrank.data import load_model

    dev, _ = lowrank.resolve_device(device)
    if Path(name).is_dir():
        model = lowrank.load(name, device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(name)
    else:

        model, tokenizer = load_model(name, dtype=torch.float32)
    return model.to(dev).eval(), tokenizer, dev
