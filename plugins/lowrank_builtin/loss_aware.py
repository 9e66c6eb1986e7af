"""SVD-LLM V2's heterogeneous ratio allocation (Wang et al., NAACL 2025), in a precise reading.

Matrices are grouped by type (their module name inside the block: ``self_attn.q_proj``,
``mlp.down_proj``, GPT-2's ``attn.c_attn``...). For each matrix the theoretical truncation loss at
the target ratio R is L_i = ||(W - W_k) X||_F at the uniform rank k; with a whitening-type scaling
(the scaled spectrum's squared singular values are the activation-norm energy) this is the dropped
energy sqrt(sum_{j >= k} sigma_j^2) of the scaled spectrum, up to the sqrt(tokens) factor of the
calibration set. Within a group, matrices with a larger loss give up a smaller share of their
parameters, and every group still removes R of its parameters.

The paper's pseudocode (normalise with 1/log(L), r_i = Len(L_G) x R x L_norm_i / Sum(L_G)) leaves
the units of L and the case log(L) <= 0 open. This module reads it as (see docs/global-allocation.md):

    L_i   the loss over the whole calibration set: sqrt(tokens) x the per-token RMS loss
          (``loss_scale: total``, the paper's ||C - C'||_F) or relative to the group's smallest
          loss, e x L_i / min_G L (``loss_scale: relative``, unit-free: weights 1 / (1 + ln(L_i / L_min)));
    w_i   1 / ln(L_i), with ln(L_i) floored at ``min_log`` (so L_i <= 1 cannot flip the sign);
    r_i   clip(c x R x w_i / mean_G(w), 0, max_ratio), with c >= 0 found by bisection so the group
          removes R of its parameters; then single components are moved so the group stores at
          most floor(dense_G (1 - R)) parameters and no further component fits (within one
          component of R).

Scope global (it needs every spectrum), no gradients.
"""

from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict
from typing import Literal, Sequence

from pydantic import Field

import lowrank
from lowrank import (
    Budget,
    MatrixSpectrum,
    Selection,
    breakeven_rank,
    floor_tolerant,
    stored_params,
    uniform_rank,
)

__all__ = ["LossAware", "LossAwareConfig", "matrix_type", "truncation_losses", "group_ranks", "STRATEGIES"]


@lowrank.strategy_config
class LossAwareConfig:
    loss_scale: Literal["total", "relative"] = Field(
        "total", description="total: L over all calibration tokens (the paper's ||WX - W'X||_F); "
                             "relative: e x L / (smallest L of the group), unit-free")
    min_log: float = Field(0.1, gt=0.0, description="floor of ln(L) (L <= 1 would flip the weight's sign)")
    max_ratio: float = Field(0.95, gt=0.0, le=1.0, description="most any one matrix may give up")


_INDEXED = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


def matrix_type(name: str, block: int | None = None) -> str:
    """The module's name inside its decoder block (``model.layers.3.self_attn.q_proj`` ->
    ``self_attn.q_proj``; ``transformer.h.0.attn.c_attn`` -> ``attn.c_attn``)."""
    parts = name.split(".")
    if block is not None:
        for i, p in enumerate(parts[:-1]):
            if p == str(block):
                return ".".join(parts[i + 1:])
    m = _INDEXED.search(name)
    return m.group(2) if m else name


def truncation_losses(spectra: Sequence[MatrixSpectrum], ratio: float, tokens: int = 1) -> list[float]:
    """sqrt(tokens x sum of the squared singular values dropped at the uniform rank of ``ratio``)."""
    out = []
    for s in spectra:
        k = uniform_rank(s.shape, ratio)
        sv = s.singular_values.detach().double().cpu()
        out.append(math.sqrt(max(tokens, 1) * float(sv[k:].pow(2).sum())))
    return out


def _rank_for(shape: tuple[int, int], r: float) -> int:
    """The rank removing the fraction r of a matrix's parameters (rank 0 at r = 1)."""
    return max(uniform_rank(shape, min(max(r, 0.0), 1.0)), 0)


def group_ranks(shapes: Sequence[tuple[int, int]], weights: Sequence[float], ratio: float,
                max_ratio: float = 0.95) -> list[int]:
    """Ranks for one group: ratio_i proportional to weights_i (mean R), clipped, then adjusted so the
    group stores at most floor(dense (1 - R)) parameters and no single further component fits."""
    count = len(shapes)
    dense = sum(m * n for m, n in shapes)
    allowed = floor_tolerant(dense * (1.0 - ratio))
    mean_w = sum(weights) / count
    rel = [w / mean_w for w in weights] if mean_w > 0 and all(w > 0 for w in weights) else [1.0] * count
    cap = max(max_ratio, ratio)

    def ranks_at(c: float) -> list[int]:
        return [_rank_for(sh, min(c * ratio * x, cap)) for sh, x in zip(shapes, rel)]

    def total(rs: list[int]) -> int:
        return sum(stored_params(*sh, k) for sh, k in zip(shapes, rs))

    # Removed parameters grow with c; at c >= cap / (ratio min rel) every matrix gives up cap >= R,
    # which stores at most dense (1 - R): feasible.
    lo, hi = 0.0, max(1.0, cap / (ratio * min(rel))) if ratio > 0 else 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if total(ranks_at(mid)) > allowed:
            lo = mid
        else:
            hi = mid
    ranks = ranks_at(hi)
    if total(ranks) > allowed:  # pragma: no cover - excluded by the bound above
        raise lowrank.CompressionError(f"loss-aware: cannot meet ratio {ratio} in a group of {count} matrices")
    targets = [min(hi * ratio * x, cap) for x in rel]
    # Give single components back, most over-cut matrix (relative to its target) first, while they fit.
    stored = total(ranks)
    while True:
        best = None
        for i, (sh, k) in enumerate(zip(shapes, ranks)):
            if k >= breakeven_rank(*sh) + 1 or k >= min(sh):
                continue  # already dense
            grow = stored_params(*sh, k + 1) - stored_params(*sh, k)
            if stored + grow > allowed:
                continue
            over = (1.0 - stored_params(*sh, k + 1) / (sh[0] * sh[1])) - targets[i]
            if best is None or (over, -i) > best[0]:
                best = ((over, -i), i, grow)
        if best is None:
            break
        ranks[best[1]] += 1
        stored += best[2]
    return ranks


class LossAware(lowrank.Allocator):
    """SVD-LLM V2's loss-aware allocation: per type group, larger truncation loss -> smaller cut.

    L is measured in the scaled coordinates, so it is the activation-norm loss only with a
    whitening-type scaling (whitening, or a stack ending in one).
    """

    name = "loss-aware"
    scope = "global"
    Config = LossAwareConfig

    #: calibration tokens of the run (the ``total`` loss scale); set on the copy ``prepare`` returns
    tokens: int = 1

    def prepare(self, context: lowrank.ModelContext) -> "LossAware":
        prepared = copy.copy(self)
        prepared.tokens = int(context.calibration.numel())
        return prepared

    def weights(self, spectra: Sequence[MatrixSpectrum], ratio: float) -> list[float]:
        """Per-matrix weights 1 / max(ln L_i, min_log), L_i as ``loss_scale`` says."""
        cfg = self.config
        losses = truncation_losses(spectra, ratio, self.tokens if cfg.loss_scale == "total" else 1)
        if cfg.loss_scale == "relative":
            groups: dict[str, list[int]] = {}
            for i, s in enumerate(spectra):
                groups.setdefault(matrix_type(s.name, s.block), []).append(i)
            for idx in groups.values():
                floor = min((losses[i] for i in idx if losses[i] > 0), default=1.0)
                for i in idx:
                    losses[i] = math.e * max(losses[i], floor) / floor
        return [1.0 / max(math.log(x) if x > 0 else -math.inf, cfg.min_log) for x in losses]

    def allocate(self, spectra: Sequence[MatrixSpectrum], budget: Budget) -> list[Selection]:
        weights = self.weights(spectra, budget.ratio)
        groups: "OrderedDict[str, list[int]]" = OrderedDict()
        for i, s in enumerate(spectra):
            groups.setdefault(matrix_type(s.name, s.block), []).append(i)
        ranks = [0] * len(spectra)
        for idx in groups.values():
            for i, k in zip(idx, group_ranks([spectra[i].shape for i in idx], [weights[i] for i in idx],
                                             budget.ratio, self.config.max_ratio)):
                ranks[i] = k
        return [Selection.dense() if k > breakeven_rank(*s.shape) else Selection.prefix(k)
                for s, k in zip(spectra, ranks)]


STRATEGIES = [LossAware]
