"""Analytic scalings: identity (plain SVD), ASVD's activation scaling, SVD-LLM's whitening."""

from __future__ import annotations

import torch
from pydantic import Field

import lowrank
from lowrank import Diagonal, LayerStats, Transform, Triangular

__all__ = ["Identity", "ASVD", "ASVDConfig", "Whitening", "WhiteningConfig", "cholesky_factor"]


class Identity(lowrank.Scaling):
    """Plain truncated SVD of W (no change of basis)."""

    name = "identity"

    def fit(self, weight, stats, rank=None):
        return Transform()


@lowrank.strategy_config
class ASVDConfig:
    alpha: float = Field(0.5, gt=0.0, le=4.0, description="exponent on the per-channel mean |x|")
    eps: float = Field(1e-6, ge=0.0, description="added to the scale so silent channels stay invertible")


class ASVD(lowrank.Scaling):
    """ASVD: scale input channel j by (mean |x_j|)^alpha before the SVD (Yuan et al., 2023)."""

    name = "asvd"
    Config = ASVDConfig
    requires = frozenset({"abs_mean"})

    def fit(self, weight, stats: LayerStats, rank=None):
        if stats.abs_mean is None:
            raise lowrank.RecipeError(
                "asvd needs the per-channel mean |x| of the layer's inputs in its own coordinates; "
                "put asvd before any scaling with a non-diagonal input transform (e.g. whitening)"
            )
        s = stats.abs_mean.clamp_min(0).pow(self.config.alpha) + self.config.eps
        notes = []
        if bool((s <= 0).any()):
            s = s.clamp_min(torch.finfo(s.dtype).tiny)
            notes.append("zero channel scales clamped")
        return Transform(right=Diagonal(s), notes=notes)


@lowrank.strategy_config
class WhiteningConfig:
    jitter: float = Field(1e-6, gt=0.0, lt=1.0, description="first diagonal jitter, relative to the mean eigenvalue")
    max_tries: int = Field(6, ge=1, le=20, description="Cholesky attempts, jitter x10 each time")
    eig_floor: float = Field(1e-10, gt=0.0, lt=1.0, description="eigenvalue floor of the fallback, relative to the largest")
    ridge: float = Field(0.0, ge=0.0, le=1.0, description="absolute ridge added to the covariance X X^T / tokens "
                                                         "before the Cholesky (ZS-SVD's code adds 1e-4; SVD-LLM none)")


def cholesky_factor(cov: torch.Tensor, jitter: float = 1e-6, max_tries: int = 6,
                    eig_floor: float = 1e-10) -> tuple[lowrank.Operator, list[str]]:
    """S with S S^T = cov (+ jitter), robust to rank-deficient and all-zero inputs.

    Cholesky in float64 with escalating diagonal jitter; if that still fails, an eigendecomposition
    with eigenvalues floored at ``eig_floor`` x the largest gives S = Q diag(sqrt(lambda)).
    """
    n = cov.shape[0]
    scale = float(cov.diagonal().mean()) if n else 0.0
    if not scale > 0 or not torch.isfinite(cov).all():
        # No signal at all: whitening carries no information, so keep the identity.
        eye = torch.eye(n, dtype=cov.dtype, device=cov.device)
        return Triangular(eye), ["input covariance is zero or non-finite; identity used"]
    notes: list[str] = []
    eye = torch.eye(n, dtype=cov.dtype, device=cov.device)
    l, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0 and bool(torch.isfinite(l).all()) and float(l.diagonal().min()) > 0:
        return Triangular(l), notes
    eps = jitter * scale
    for _ in range(max_tries):
        l, info = torch.linalg.cholesky_ex(cov + eps * eye)
        if int(info) == 0 and float(l.diagonal().min()) > 0:
            return Triangular(l), [f"jitter {eps / scale:.0e} x mean eigenvalue added"]
        eps *= 10
    lam, q = torch.linalg.eigh(cov)
    lam = lam.clamp_min(eig_floor * float(lam.max()))
    root = lam.sqrt()
    return lowrank.Dense(q * root[None, :], (q / root[None, :]).T), ["Cholesky failed; eigendecomposition fallback"]


class Whitening(lowrank.Scaling):
    """SVD-LLM whitening: W S with S the Cholesky factor of the inputs' second moment (Wang et al., 2024).

    Truncating the SVD of W S is optimal in the activation norm: ||(W - W')X||_F^2 equals the sum of
    the dropped squared singular values of W S.
    """

    name = "whitening"
    Config = WhiteningConfig

    def fit(self, weight, stats: LayerStats, rank=None):
        # q/k/v (and gate/up) share one LayerStats: factor their covariance once.
        key = (self.name, self.config)
        if key not in stats.cache:
            cov = stats.covariance
            if self.config.ridge:   # a fixed ridge, as ZS-SVD's profiling adds: C + ridge I
                cov = cov + self.config.ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            stats.cache[key] = cholesky_factor(cov, self.config.jitter, self.config.max_tries,
                                               self.config.eig_floor)
        op, notes = stats.cache[key]
        return Transform(right=op, notes=list(notes))
STRATEGIES = [Identity, ASVD, Whitening]
