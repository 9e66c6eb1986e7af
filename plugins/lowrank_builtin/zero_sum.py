"""Zero Sum SVD (ZS-SVD, Abbasi et al., ICML 2026): a global rank allocation from loss gradients.

In the scaled (whitened) coordinates W_s = L W R = sum_i sigma_i u_i v_i^T, deleting component i
changes the calibration loss by about dL_i = -sigma_i u_i^T H v_i, with H = L^-T G R^-T the loss
gradient for W_s (first order; ``order: 2`` adds the diagonal second-order term
+1/2 sigma_i^2 (u_i^T H v_i)^2). Every matrix offers only its current smallest remaining component;
the candidates sit in two min-heaps ordered by |dL| (one for dL >= 0, one for dL < 0) and the
selection keeps the running sum of predicted changes near zero: while the sum is <= 0 it takes from
the dL >= 0 heap, otherwise from the dL < 0 heap (falling back to the other when one is empty),
until the parameter budget is met. Parameters are counted exactly: dropping components of a
dense m x n matrix saves nothing until its rank reaches r* = floor((m n - 1) / (m + n)); there the
saving is m n - r* (m + n), and (m + n) per component after. A matrix whose planned rank stays
above r* is kept dense.

The optional correction (``stages`` > 1) runs between planning stages: every planned-compressed
matrix is set to its truncation W_t, Delta = W_teacher - W_t, the calibration-loss gradients g_b at
the truncated weights are taken on a few batches, and the projection of Delta onto span{g_b},
G (G^T G + eps I)^-1 G^T Delta, is added (per matrix). The next stage re-profiles, re-scores and
re-plans from the corrected weights; the last one lands on the planned ranks.

Where the published code and its intent part, ``dense_matrices`` says which runs. The intent
(``original``, the default; the scripts' ``--sub_with_teacher_module``): a matrix planned dense
holds its original weight between stages and at the end. The published code (``refined``, the
``zs-svd-multistage`` preset), in which that flag never takes effect: a matrix is never reset, so a matrix compressed in one stage and planned dense in the next
keeps its truncated and corrected weight, is corrected again like the others, and is stored
dense with that weight at the end. Each correction batch is one calibration window drawn at
random, its last ``correction_seqlen`` tokens (all of it when the windows are shorter), as the
published code cuts it. The published script also casts the model to float16 after every stage's
truncation (``--save_after_truncation``), so its later stages profile, score and correct float16
weights; ``stage_rounding: float16`` rounds every targeted weight a stage hands on to float16
(after its truncation and after its correction) to measure what that costs. It rounds the weights
only: the arithmetic stays in the compute dtype, and untargeted weights (embeddings, norms) keep
their precision.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Literal, Sequence

import torch
from pydantic import Field

import lowrank
from lowrank import (
    Budget,
    MatrixSpectrum,
    Selection,
    breakeven_rank,
    build_factors,
    max_positions,
    stored_params,
)

__all__ = ["ZeroSum", "ZeroSumConfig", "zero_sum_ranks", "component_floor", "published_keep_rank_ratio",
           "predicted_changes", "project_onto_gradients", "STRATEGIES"]


@lowrank.strategy_config
class ZeroSumConfig:
    order: Literal[1, 2] = Field(1, description="1: dL = -sigma g; 2: -sigma g + 1/2 sigma^2 g^2 (g = u^T H v)")
    gradient_windows: int = Field(1, ge=1, description="sequences for the scoring gradients (published: 1)")
    gradient_seqlen: int = Field(2048, ge=2, description="tokens per gradient sequence (published: 2048)")
    lean: bool = Field(True, description="score inside the gradient hook and drop each gradient at once")
    keep_rank_ratio: float | None = Field(
        0.0, ge=0.0, le=1.0,
        description="every matrix keeps at least max(1, ceil(this x r*)) components (published: 0 at "
                    "ratios 0.2/0.4, 0.3 at 0.6); null: the published value for the run's ratio (0 up to "
                    "0.4, 0.3 to 0.6, then 0.75 x (1 - ratio))")
    stages: int = Field(1, ge=1, le=50, description="planning stages; the correction runs between two "
                                                    "(published multi-stage scripts: 6)")
    correction_batches: int = Field(1, ge=1, description="gradient batches of the correction (published: 1)")
    correction_seqlen: int = Field(1024, ge=2, description="tokens per correction batch (published: 1024)")
    eps: float = Field(1e-6, ge=0.0, description="ridge of the projection onto the gradients' span")
    correction_seed: int = Field(1, ge=0, description="seed of the correction batches' draw (stage s draws with "
                                                      "this + s; the published code draws at random)")
    dense_matrices: Literal["original", "refined"] = Field(
        "original", description="what a matrix planned dense holds between stages and at the end: its "
                                "original weight, or (refined, the published code) the weight earlier "
                                "stages' truncations and corrections left, corrected again like the others")
    stage_rounding: Literal["none", "float16", "bfloat16"] = Field(
        "none", description="round every targeted weight a stage hands on to this precision, after its "
                            "truncation and after its correction (the published script casts the model "
                            "to float16 after every truncation); none keeps the compute dtype")


# -- scores ---------------------------------------------------------------------------------------


def predicted_changes(sigma: torch.Tensor, g: torch.Tensor, order: int = 1) -> torch.Tensor:
    """dL_i of deleting component i from sigma_i and g_i = dL/dsigma_i = u_i^T H v_i."""
    d = -sigma * g
    if order == 2:
        d = d + 0.5 * sigma.pow(2) * g.pow(2)
    return d


def _unscaled_bases(svd) -> tuple[torch.Tensor, torch.Tensor]:
    """(L^-1 U, R^-T V): u_i^T (L^-T G R^-T) v_i = (L^-1 u_i)^T G (R^-T v_i) for any chain of transforms."""
    ones = dataclasses.replace(svd, s=torch.ones_like(svd.s))
    a, b = build_factors(ones, Selection.prefix(svd.s.numel()))   # a = L^-1 U, b = V^T R^-1
    return a, b.T


# -- the selection --------------------------------------------------------------------------------


def published_keep_rank_ratio(ratio: float) -> float:
    """The rank floor ZS-SVD's released scripts set for ``ratio``: 0 at 0.2 and 0.4, 0.3 at 0.6.

    The scripts give no other ratio (a stated choice for the rest): 0 up to 0.4, 0.3 above 0.4 up
    to 0.6, and above 0.6 a floor that spends the same share of the budget as 0.3 does at 0.6
    (floors of f x r* components store f of the dense parameters, 0.3 of the 0.4 kept at 0.6), so
    0.75 x (1 - ratio): a fixed 0.3 could not reach ratios above 0.7 at all."""
    if ratio <= 0.4 + 1e-9:
        return 0.0
    return min(0.3, 0.75 * (1.0 - ratio))


def component_floor(shape: tuple[int, int], keep_rank_ratio: float) -> int:
    """The fewest components a matrix keeps: max(1, ceil(keep_rank_ratio x r*)) (ZS-SVD's rule)."""
    r_star = breakeven_rank(*shape)
    return min(max(1, math.ceil(keep_rank_ratio * r_star - 1e-12)), min(shape))


def zero_sum_ranks(shapes: Sequence[tuple[int, int]], scores: Sequence[Sequence[float]], allowed: int,
                   floors: Sequence[int] | None = None,
                   removed: list[tuple[int, int]] | None = None) -> tuple[list[int], float]:
    """The zero-sum greedy selection; returns (planned rank per matrix, final running sum).

    ``scores[j][i]`` is the predicted loss change of deleting component i (descending spectrum
    order) of matrix j. Components go from the end of each spectrum. The loop stops as soon as the
    stored parameters (dense while the rank is above r*) are at most ``allowed``, or when no
    matrix can give up another component (``floors``). ``removed``, when given, receives every
    deleted (matrix, component) in the order of deletion.
    """
    count = len(shapes)
    floors = [1] * count if floors is None else list(floors)
    ranks = [min(s) for s in shapes]
    stored = [m * n for m, n in shapes]
    total = sum(stored)
    positive: list[tuple[float, int]] = []   # candidates with dL >= 0, keyed by |dL| then matrix
    negative: list[tuple[float, int]] = []   # candidates with dL < 0

    def offer(j: int) -> None:
        if ranks[j] > floors[j]:
            d = float(scores[j][ranks[j] - 1])
            heapq.heappush(positive if d >= 0 else negative, (abs(d), j))

    for j in range(count):
        offer(j)
    running = 0.0
    while total > allowed and (positive or negative):
        first, second = (positive, negative) if running <= 0 else (negative, positive)
        _, j = heapq.heappop(first if first else second)
        ranks[j] -= 1
        running += float(scores[j][ranks[j]])
        if removed is not None:
            removed.append((j, ranks[j]))
        now = stored_params(*shapes[j], ranks[j])
        total += now - stored[j]
        stored[j] = now
        offer(j)
    return ranks, running


# -- the correction -------------------------------------------------------------------------------


def project_onto_gradients(delta: torch.Tensor, grads: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    """G (G^T G + eps I)^-1 G^T Delta with the gradients as the columns of G (flattened)."""
    g = torch.stack([x.reshape(-1).to(torch.float64) for x in grads], 1)   # (m n) x b
    d = delta.reshape(-1).to(torch.float64)
    gram = g.T @ g + eps * torch.eye(g.shape[1], dtype=g.dtype, device=g.device)
    coeff = torch.linalg.solve(gram, g.T @ d)
    return (g @ coeff).reshape(delta.shape)


def _correction_windows(calibration: torch.Tensor, batches: int, seqlen: int, seed: int) -> torch.Tensor:
    """``batches`` calibration windows drawn at random, each cut to its last ``seqlen`` tokens (the
    whole window when it is shorter), as the published code takes its correction batches."""
    g = torch.Generator().manual_seed(seed)
    n, length = calibration.shape
    rows = torch.randint(0, n, (batches,), generator=g)
    return calibration[rows, max(0, length - seqlen):]


class ZeroSum(lowrank.Allocator):
    """ZS-SVD's zero-sum global selection from first-order loss changes, with its optional correction.

    Needs a gradient pass (``gradient_windows`` x ``gradient_seqlen`` tokens, by default re-cut from
    the calibration windows; ``lowrank.compress(..., gradient_data=...)`` passes other windows).
    Use it with a whitening-type scaling, as published.
    """

    name = "zero-sum"
    scope = "global"
    Config = ZeroSumConfig

    @property
    def stages(self) -> int:  # type: ignore[override]
        return self.config.stages

    @property
    def lean_gradients(self) -> bool:  # type: ignore[override]
        return self.config.lean

    def gradient_windows(self):
        return (self.config.gradient_windows, self.config.gradient_seqlen)

    def component_scorer(self, spectrum, svd):
        # (L^-1 U) and (R^-T V) in float32, so the hook computes diag(U^T H V) as
        # colsum(U' * (G V')) without forming H. They wait for the gradient pass on the host: every
        # matrix's bases together are about twice the targeted parameters, which must not sit on
        # the GPU beside the model; each hook moves its own pair over and drops it.
        left, right = _unscaled_bases(svd)
        left, right = left.to("cpu", torch.float32).contiguous(), right.to("cpu", torch.float32).contiguous()
        sigma = svd.s.to("cpu", torch.float64)
        order = self.config.order

        def scorer(grad: torch.Tensor) -> torch.Tensor:
            g = grad.to(torch.float32)
            dl_dsigma = (left.to(g.device) * (g @ right.to(g.device))).sum(0).double()
            return predicted_changes(sigma.to(dl_dsigma.device), dl_dsigma, order)

        return scorer

    def allocate(self, spectra: Sequence[MatrixSpectrum], budget: Budget) -> list[Selection]:
        scores = []
        for s in spectra:
            if s.scores is None:
                raise lowrank.CompressionError(
                    f"allocator 'zero-sum' needs per-component scores for {s.name} (a gradient pass); "
                    "the pipeline provides them, a direct call must pass MatrixSpectrum.scores")
            sc = s.scores.detach().double().cpu()
            if not bool(torch.isfinite(sc).all()):
                raise lowrank.CompressionError(f"allocator 'zero-sum': non-finite loss-change scores for {s.name}")
            scores.append(sc.tolist())
        shapes = [s.shape for s in spectra]
        keep = self.config.keep_rank_ratio
        keep = published_keep_rank_ratio(budget.ratio) if keep is None else keep
        floors = [component_floor(sh, keep) for sh in shapes]
        ranks, _ = zero_sum_ranks(shapes, scores, budget.allowed_params, floors)
        total = sum(stored_params(*sh, k) for sh, k in zip(shapes, ranks))
        if total > budget.allowed_params:
            raise lowrank.CompressionError(
                f"allocator 'zero-sum': the ratio {budget.ratio} cannot be met with keep_rank_ratio "
                f"{keep} (at most {1 - total / budget.dense_params:.4f} removable); "
                "lower keep_rank_ratio")
        return [Selection.dense() if k > breakeven_rank(*sh) else Selection.prefix(k) for sh, k in zip(shapes, ranks)]

    # -- the correction between stages ----------------------------------------------------------

    @property
    def restores_dense(self) -> bool:  # type: ignore[override]
        return self.config.dense_matrices == "original"

    def refine(self, context, plan) -> None:
        cfg = self.config
        corrected = set()   # the matrices the correction moves
        for t in context.targets:
            sel = plan[t.name]
            if sel.is_dense or sel.params(t.shape) >= t.shape[0] * t.shape[1]:
                if cfg.dense_matrices == "original":
                    context.set_weight(t.name, context.teacher[t.name])
                else:   # the published code: left as the earlier stages made it, and corrected
                    corrected.add(t.name)
            else:
                svd = context.profiles.pop(t.name).to(context.device)   # freed as we go
                a, b = build_factors(svd, sel)
                context.set_weight(t.name, a @ b)
                corrected.add(t.name)
                del svd, a, b
        limit = max_positions(context.model) or cfg.correction_seqlen
        windows = _correction_windows(context.calibration, cfg.correction_batches, min(cfg.correction_seqlen, limit),
                                      seed=cfg.correction_seed + context.stage)
        context.profiles.clear()   # the next stage re-profiles; free this one's SVDs before it does
        self._round(context)
        info = self._correct(context, corrected, windows)
        self._round(context)
        after = context.loss(windows, batch_size=1)
        context.notes.append(f"zero-sum correction {context.stage + 1}/{context.stages - 1}: loss on its "
                             f"{windows.shape[0]} x {windows.shape[1]} tokens {info.loss:.4f} (truncated) -> "
                             f"{after:.4f} (corrected)")

    def _round(self, context) -> None:
        """Round every targeted weight to ``stage_rounding`` (kept in its own dtype)."""
        if self.config.stage_rounding == "none":
            return
        precision = getattr(torch, self.config.stage_rounding)
        with torch.no_grad():
            for t in context.targets:
                w = context.module(t.name).weight
                w.copy_(w.to(precision).to(w.dtype))

    def _correct(self, context, names: set[str], windows: torch.Tensor):
        """Add to every matrix in ``names`` the projection of (teacher - current) onto its gradients."""
        eps = self.config.eps
        modules = {name: context.module(name) for name in names}

        def out_in(name: str, w: torch.Tensor) -> torch.Tensor:
            return lowrank.as_out_in(modules[name], w)

        if windows.shape[0] == 1 and self.config.lean:
            # One gradient: the projection is (<g, Delta> / (<g, g> + eps)) g, applied inside the hook.
            def probe(name: str, g: torch.Tensor) -> None:
                if name not in modules:
                    return
                w = modules[name].weight
                delta = context.teacher[name].to(w.device, torch.float64) - out_in(name, w.detach()).double()
                g64 = g.double()
                coeff = (g64 * delta).sum() / ((g64 * g64).sum() + eps)
                with torch.no_grad():
                    w.add_(out_in(name, (coeff * g64).to(w.dtype)))

            return context.gradient_pass(probe, windows, lean=True)

        grads: dict[str, list[torch.Tensor]] = {name: [] for name in names}

        def keep(name: str, g: torch.Tensor) -> None:
            if name in grads:
                grads[name].append(g.detach().to("cpu", torch.float32, copy=True))

        info = context.gradient_pass(keep, windows, lean=self.config.lean)
        for name in names:
            current = context.weight(name)
            step = project_onto_gradients(context.teacher[name] - current, grads.pop(name), eps)
            context.set_weight(name, current + step)
        return info


STRATEGIES = [ZeroSum]
