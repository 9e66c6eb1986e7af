"""Perplexity of a causal LM over token windows.

Perplexity is ``exp`` of the mean next-token negative log-likelihood over every
predicted token of every window (``windows * (seqlen - 1)`` tokens), the protocol of
the SVD-compression papers. Losses are summed per token in float32 and accumulated in
float64, so batch size does not change the result beyond float32 rounding. A broken
model (NaN or infinite loss) is reported as such, never skipped.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .._contract.model import max_positions
from .._engine.losses import next_token_nll

if TYPE_CHECKING:
    from torch import nn

__all__ = ["PerplexityResult", "perplexity", "check_context"]


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(nll)``; ``inf`` or ``nan`` when the loss is not finite or
            ``exp`` overflows.
        nll: Mean next-token negative log-likelihood (nats per token).
        tokens: Number of predicted tokens (``windows * (seqlen - 1)``).
        seconds: Wall time of the evaluation.
        finite: Whether ``perplexity`` is a finite number.
    """

    perplexity: float
    nll: float
    tokens: int
    seconds: float
    finite: bool


def check_context(model: nn.Module, windows: torch.Tensor, role: str) -> None:
    """Refuse windows longer than the positions the model's config declares (before any forward)."""
    limit = max_positions(model)
    if limit is not None and windows.shape[-1] > limit:
        raise ValueError(
            f"{role} windows of {windows.shape[-1]} tokens are longer than the model's context of "
            f"{limit} positions (its config's max_position_embeddings / n_positions); pass a "
            f"sequence length of at most {limit} (--seqlen {limit})"
        )


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Compute perplexity of a causal LM over token windows.

    Args:
        model: A causal LM whose forward returns ``.logits`` of shape
            ``(batch, seqlen, vocab)``.
        windows: ``(n, seqlen)`` long tensor of token ids (see
            :func:`lowrank.data.evaluation_windows`).
        batch_size: Windows per forward pass.
        device: Where to run; ``None`` uses the device of the model's parameters.
        progress: Show a tqdm bar over batches on stderr.

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        ValueError: ``windows`` is not 2-D with at least two tokens per window, or its windows
            are longer than the model's context (``max_position_embeddings``).
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(
            f"windows must have shape (n >= 1, seqlen >= 2), got {tuple(windows.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_context(model, windows, "evaluation")
    run_on = torch.device(device) if device is not None else _model_device(model)
    progress_bar = None
    if progress:
        from tqdm.auto import tqdm

        def progress_bar(starts):
            return tqdm(starts, desc="perplexity", unit="batch", file=sys.stderr, leave=False)

    begin = time.perf_counter()
    total, tokens = next_token_nll(model, windows, batch_size, run_on, progress_bar)
    seconds = time.perf_counter() - begin
    nll = total / tokens
    try:
        ppl = math.exp(nll)
    except OverflowError:
        ppl = math.inf
    return PerplexityResult(
        perplexity=ppl, nll=nll, tokens=tokens, seconds=seconds, finite=math.isfinite(ppl)
    )
