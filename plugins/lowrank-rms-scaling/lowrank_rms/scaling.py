"""The ``rms`` scaling: weight each input channel by its activation RMS before the SVD."""

from __future__ import annotations

import torch
from pydantic import Field

import lowrank

__all__ = ["RMSScaling", "RMSConfig"]


@lowrank.strategy_config
class RMSConfig:
    """Settings of the ``rms`` scaling."""

    alpha: float = Field(1.0, gt=0.0, le=4.0, description="exponent on the channel RMS")
    eps: float = Field(1e-6, gt=0.0, description="floor, relative to the largest RMS, for silent channels")


class RMSScaling(lowrank.Scaling):
    """Scale input channel j by RMS(x_j)^alpha (the diagonal of the whitening transform)."""

    name = "rms"
    Config = RMSConfig

    def fit(self, weight: torch.Tensor, stats: lowrank.LayerStats, rank: int | None = None) -> lowrank.Transform:
        rms = stats.covariance.diagonal().clamp_min(0).sqrt()
        floor = self.config.eps * float(rms.max()) if float(rms.max()) > 0 else 1.0
        notes = ["all channels silent; identity used"] if float(rms.max()) == 0 else []
        return lowrank.Transform(right=lowrank.Diagonal(rms.clamp_min(floor).pow(self.config.alpha)), notes=notes)
