"""The calibration language-model loss, without gradients (perplexity and ``ModelContext.loss``)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["next_token_nll"]


@torch.no_grad()
def next_token_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                   device: torch.device | None = None, progress: Callable[[Iterable[int]], Iterable[int]] | None = None
                   ) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, predicted tokens) of ``model`` on ``windows``.

    Losses are summed per token in float32 and accumulated in float64 (a Python float), one row at
    a time: a float32 copy of (batch, seqlen, vocab) logits is large for 262k-entry vocabularies.
    ``progress`` wraps the iterable of batch starts (e.g. a tqdm bar).
    """
    run_on = device if device is not None else next(model.parameters()).device
    n, seqlen = windows.shape
    starts: Iterable[int] = range(0, n, batch_size)
    if progress is not None:
        starts = progress(starts)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in starts:
            ids = windows[start : start + batch_size].to(run_on)
            logits = model(input_ids=ids, use_cache=False).logits
            for row in range(ids.shape[0]):
                total += F.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="sum").item()
            del logits
    finally:
        model.train(was_training)
    return total, n * (seqlen - 1)
