"""The ``activation-energy`` allocator: keep the components with the most activation-weighted
energy across the whole model.

After a whitening-type scaling (``whitening``, or the diagonal ``rms`` of this package) the scaled
weight is W_s = W R with R R^T about the calibration Gram matrix X X^T, so
||W_s||_F^2 = ||W X||_F^2 and dropping component i of W_s = sum_i sigma_i u_i v_i^T adds exactly
sigma_i^2 to the matrix's output error ||(W - W_k) X||_F^2. Component i's *energy* is therefore
sigma_i^2, in the matrix's own activation-weighted coordinates; with ``normalize`` (the default)
it is divided by the matrix's total sum_j sigma_j^2, i.e. the fraction of that matrix's output
energy the component carries.

The allocation is one model-wide ranking: every matrix first gets ``min_rank`` components, then
the remaining components of all matrices are taken in decreasing energy while the parameter budget
allows. Parameters are counted exactly as the engine stores them (``lowrank.stored_params``): a
factored matrix costs k (m + n) up to its break-even rank r* = ``lowrank.breakeven_rank(m, n)``;
the component after r* makes it dense and costs m n - r* (m + n), and every later one costs
nothing. A matrix past r* is returned dense, any other one as the prefix of its k components.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

import lowrank
from lowrank import Budget, MatrixSpectrum, Selection, breakeven_rank, stored_params

__all__ = ["ActivationEnergy", "ActivationEnergyConfig", "component_energies"]


@lowrank.strategy_config
class ActivationEnergyConfig:
    """Settings of the ``activation-energy`` allocator.

    Attributes:
        normalize: Divide each matrix's energies by its total energy (scale-free: the ranking
            minimises the sum of the matrices' relative output errors). False ranks the raw
            sigma_i^2 (minimises the sum of absolute output errors, which favours the matrices
            with the largest activations).
        min_rank: Components every matrix keeps whatever their energy (a matrix where that many
            save nothing stays dense).
    """

    normalize: bool = Field(
        True, description="rank sigma_i^2 / sum_j sigma_j^2 per matrix (True) or the raw sigma_i^2 (False)")
    min_rank: int = Field(1, ge=1, description="components every matrix keeps at least")


def component_energies(spectrum: MatrixSpectrum, normalize: bool = True) -> torch.Tensor:
    """sigma_i^2 of one matrix (float64, CPU, non-increasing), divided by its sum if ``normalize``.

    A spectrum whose total energy is zero (or not finite) gives zeros.
    """
    energy = spectrum.singular_values.detach().to("cpu", torch.float64).pow(2)
    energy = torch.nan_to_num(energy, nan=0.0, posinf=0.0)
    if energy.numel():
        energy = torch.cummin(energy, 0).values  # guard the prefix order against round-off
    if normalize:
        total = float(energy.sum())
        energy = energy / total if total > 0 else torch.zeros_like(energy)
    return energy


class ActivationEnergy(lowrank.Allocator):
    """Keep, model-wide, the singular components with the largest activation-weighted energy.

    A global allocator: it needs every matrix's spectrum before it decides any rank. It never
    stores more than ``budget.allowed_params``; when even ``min_rank`` components per matrix do not
    fit it raises :class:`lowrank.CompressionError`.
    """

    name = "activation-energy"
    scope = "global"
    Config = ActivationEnergyConfig

    def allocate(self, spectra: Sequence[MatrixSpectrum], budget: Budget) -> list[Selection]:
        allowed = budget.allowed_params
        ranks = [min(self.config.min_rank, s.full_rank) for s in spectra]
        spent = sum(stored_params(*s.shape, k) for s, k in zip(spectra, ranks))
        if spent > allowed:
            raise lowrank.CompressionError(
                f"allocator {self.name!r}: {self.config.min_rank} component(s) per matrix already store "
                f"{spent:,} parameters, more than the {allowed:,} that ratio {budget.ratio:g} allows; "
                f"lower the ratio or min_rank")

        # (-energy, matrix, component): one sort gives the global order, and within a matrix the
        # components come in index order (energies are non-increasing), so ranks stay prefixes.
        candidates: list[tuple[float, int, int]] = []
        for i, s in enumerate(spectra):
            energy = component_energies(s, self.config.normalize).tolist()
            candidates.extend((-energy[j], i, j) for j in range(ranks[i], s.full_rank) if energy[j] > 0)
        candidates.sort()

        closed = [k > breakeven_rank(*s.shape) for s, k in zip(spectra, ranks)]  # dense already
        for _, i, j in candidates:
            if closed[i] or j != ranks[i]:
                continue
            m, n = spectra[i].shape
            cost = stored_params(m, n, j + 1) - stored_params(m, n, j)
            if spent + cost > allowed:
                closed[i] = True  # a prefix cannot skip this component to take a later one
                continue
            spent += cost
            ranks[i] = j + 1
            if ranks[i] > breakeven_rank(m, n):
                closed[i] = True  # dense now: the rest of its components are free

        return [Selection.dense() if k > breakeven_rank(*s.shape) else Selection.prefix(k)
                for s, k in zip(spectra, ranks)]

