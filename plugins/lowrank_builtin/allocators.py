"""Rank allocators: uniform (the same fraction from every matrix) and energy (spectral energy kept)."""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

import lowrank
from lowrank import Budget, MatrixSpectrum, Selection, stored_params, uniform_rank

__all__ = ["Uniform", "Energy", "EnergyConfig"]


class Uniform(lowrank.Allocator):
    """The same fraction removed from every matrix: k = floor(m n (1 - r) / (m + n))."""

    name = "uniform"
    scope = "matrix"

    def rank_hint(self, shape: tuple[int, int], ratio: float) -> int:
        return uniform_rank(shape, ratio)

    def allocate(self, spectra: Sequence[MatrixSpectrum], budget: Budget) -> list[Selection]:
        return [Selection.prefix(uniform_rank(s.shape, budget.ratio)) for s in spectra]


@lowrank.strategy_config
class EnergyConfig:
    fraction: float | None = Field(
        None, gt=0.0, le=1.0,
        description="keep the smallest k whose squared singular values hold this fraction of the "
                    "energy; None: one global fraction chosen to meet the recipe's ratio",
    )


def _rank_for_energy(s: torch.Tensor, fraction: float) -> int:
    energy = s.double().pow(2)
    total = float(energy.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(energy, 0) / total
    # smallest k with cum[k-1] >= fraction (tolerance for round-off at fraction 1)
    return min(int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype, device=cum.device))) + 1, s.numel())


class Energy(lowrank.Allocator):
    """Keep the smallest rank that holds a fraction of each scaled spectrum's energy.

    With ``fraction`` unset, one fraction is shared by every matrix and chosen by bisection as the
    largest that meets the parameter budget (a global allocation: matrices with concentrated
    spectra get small ranks, flat ones large).
    """

    name = "energy"
    Config = EnergyConfig

    @property
    def scope(self):  # type: ignore[override]
        return "matrix" if self.config.fraction is not None else "global"

    def allocate(self, spectra: Sequence[MatrixSpectrum], budget: Budget) -> list[Selection]:
        if self.config.fraction is not None:
            return [Selection.prefix(_rank_for_energy(s.singular_values, self.config.fraction)) for s in spectra]
        cums = []
        for s in spectra:
            e = s.singular_values.double().cpu().pow(2)
            total = float(e.sum())
            cums.append(torch.cumsum(e, 0) / total if total > 0 else torch.ones_like(e))

        def ranks(f: float) -> list[int]:
            return [min(int(torch.searchsorted(c, torch.tensor(f - 1e-12, dtype=c.dtype))) + 1, c.numel()) for c in cums]

        def params(rs: list[int]) -> int:
            return sum(stored_params(*s.shape, k) for s, k in zip(spectra, rs))

        lo, hi = 0.0, 1.0  # params(ranks(f)) is non-decreasing in f
        if params(ranks(hi)) <= budget.allowed_params:
            lo = hi
        else:
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                if params(ranks(mid)) <= budget.allowed_params:
                    lo = mid
                else:
                    hi = mid
        chosen = ranks(lo)
        if params(chosen) > budget.allowed_params:  # f = 0 still keeps rank 1 everywhere
            chosen = [0] * len(spectra)
        return [Selection.prefix(k) for k in chosen]
STRATEGIES = [Uniform, Energy]
