"""FWSVD: Fisher-weighted SVD (Hsu et al., ICLR 2022).

The Fisher information of W is estimated from squared calibration-loss gradients summed per row
(output channel): I_r = sum over batches of sum_j (dL/dW_rj)^2. The left scaling
L = diag(sqrt(I_r)) weights each row's reconstruction error by its importance; the SVD of L W is
truncated and L^-1 is folded back into the factors. The pipeline runs the gradient pass (one
window per batch over the calibration windows, or ``lowrank.compress(..., gradient_data=...)``)
because this scaling lists ``grad_row_sq`` in ``requires``.

Rows whose Fisher estimate is zero (or tiny) would make L singular: the scale is floored at
``floor`` x the largest one and the report says how many rows were floored.
"""

from __future__ import annotations

import torch
from pydantic import Field

import lowrank
from lowrank import Diagonal, LayerStats, Transform

__all__ = ["FWSVD", "FWSVDConfig", "STRATEGIES"]


@lowrank.strategy_config
class FWSVDConfig:
    floor: float = Field(1e-3, gt=0.0, lt=1.0,
                         description="smallest row scale, relative to the largest (keeps L invertible)")


class FWSVD(lowrank.Scaling):
    """Left scaling by the square root of the per-row Fisher information (summed squared gradients)."""

    name = "fwsvd"
    Config = FWSVDConfig
    requires = frozenset({"grad_row_sq"})

    def fit(self, weight, stats: LayerStats, rank=None):
        fisher = stats.grad_row_sq
        if fisher is None:
            raise lowrank.RecipeError("fwsvd needs the per-row squared calibration-loss gradients "
                                      "(stats.grad_row_sq); the pipeline collects them")
        fisher = fisher.to(weight.device, torch.float64).reshape(-1)
        if fisher.numel() != weight.shape[0]:
            raise lowrank.CompressionError(f"fwsvd: {fisher.numel()} row Fisher values for a weight with "
                                           f"{weight.shape[0]} rows")
        scale = fisher.clamp_min(0).sqrt()
        top = float(scale.max()) if scale.numel() else 0.0
        if not top > 0 or not torch.isfinite(scale).all():
            return Transform(notes=["zero or non-finite Fisher information; identity used"])
        low = scale < self.config.floor * top
        notes = []
        if bool(low.any()):
            scale = scale.clamp_min(self.config.floor * top)
            notes.append(f"rows with (near-)zero Fisher information: scale floored at {self.config.floor:g} x the largest")
        return Transform(left=Diagonal(scale), notes=notes)


STRATEGIES = [FWSVD]
