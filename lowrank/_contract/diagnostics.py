"""Spectral diagnostics: how many singular components a matrix effectively uses.

Two measures of a spectrum sigma_1 >= ... >= sigma_r >= 0:

- entropy effective rank exp(-sum p_i log p_i) with p = sigma / sum sigma (Roy & Vetterli, 2007);
- participation ratio (sum sigma)^2 / sum sigma^2.

Both equal r for a flat spectrum and 1 for a single non-zero value; an all-zero spectrum gives 0.
The ``*_tensor`` forms are differentiable and work on batches (the last dimension is the spectrum),
so a learned scaling can use them as a penalty.
"""

from __future__ import annotations

import torch

__all__ = ["effective_rank", "participation_ratio", "effective_rank_tensor", "participation_ratio_tensor",
           "spectrum_diagnostics"]


def effective_rank_tensor(s: torch.Tensor) -> torch.Tensor:
    """exp(-sum p log p), p = s / sum s, over the last dimension (0 where the spectrum is all zero)."""
    s = s.clamp_min(0)
    total = s.sum(-1, keepdim=True)
    p = s / torch.where(total > 0, total, torch.ones_like(total))
    safe = torch.where(p > 0, p, torch.ones_like(p))  # 0 log 0 = 0, with a finite gradient
    h = -(p * safe.log()).sum(-1)
    return torch.where(total[..., 0] > 0, h.exp(), torch.zeros_like(h))


def participation_ratio_tensor(s: torch.Tensor) -> torch.Tensor:
    """(sum s)^2 / sum s^2 over the last dimension (0 where the spectrum is all zero)."""
    s = s.clamp_min(0)
    den = s.pow(2).sum(-1)
    num = s.sum(-1).pow(2)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank exp(-sum p log p), p = sigma / sum sigma."""
    if s.numel() == 0:
        return 0.0
    return float(effective_rank_tensor(s.detach().double()))


def participation_ratio(s: torch.Tensor) -> float:
    """(sum sigma)^2 / sum sigma^2."""
    if s.numel() == 0:
        return 0.0
    return float(participation_ratio_tensor(s.detach().double()))


def spectrum_diagnostics(s: torch.Tensor, suffix: str = "") -> dict[str, float]:
    """``{"effective_rank<suffix>": ..., "participation_ratio<suffix>": ...}`` of one spectrum."""
    return {f"effective_rank{suffix}": effective_rank(s), f"participation_ratio{suffix}": participation_ratio(s)}
