"""The compensated target (recipe ``target: compensated``): undo the error of the earlier blocks.

With sequential inputs, block i of the compressed model receives X~ where the original model had
X. Fitting each layer on X~ alone (``target: plain``) reproduces W X~, not W X, so the error of
the earlier blocks is carried forward. The compensated target asks for the rank-k W' closest to
the *original* output on the *compressed* inputs (SAES-SVD, ``methods.md`` section 21):

    min over rank-k W' of  sum_t || W x_t - W' x~_t ||^2.

With C = sum x~ x~^T (the Gram the statistics hooks already accumulate on X~) and
M = sum x x~^T (the cross-covariance accumulated here), the unconstrained minimiser is
W* = W M C^-1, and the residual W X - W* X~ is orthogonal to every W' X~, so

    sum_t || W x_t - W' x~_t ||^2 = const + || (W* - W') X~ ||^2.

The rank-k problem is therefore the usual one with W* in place of W and the usual statistics of
X~: every scaling composes with it unchanged (whitening by C is then exactly optimal). No training,
one extra dense forward pass per block (the original stream) and one n x n GEMM per layer and batch.

The ridge regularises the *correction*, not the map: with D = W* - W,
min_D ||W X - (W + D) X~||^2 + lambda ||D||^2 gives D = W (M - C)(C + lambda I)^-1. A ridge on W*
itself would pull it towards zero in the directions X~ barely visits (SmolLM2's activations have a
few channels a hundred times larger than the rest, so a ridge relative to the mean diagonal is
large for most channels), and those directions do appear in other text; this one pulls towards
the plain target instead, and D = 0 exactly when X~ = X. ``lambda`` is ``RIDGE`` times the mean
diagonal of C, raised when the Cholesky fails (the report says so).

**Strength** (recipe ``compensation``). SAES-SVD's objective (CEALC) adds the compensation to the
local fit with a weight beta: ||W X~ - W' X~||^2 + beta ||W X - W' X~||^2. Its full-rank minimiser
is W + alpha D with alpha = beta / (1 + beta), so the strength alpha in [0, 1] runs from the plain
target (0) to full compensation (1), and the rank-k problem stays the scaled truncation of that
target. ``adaptive`` is our reading of SAES-SVD's ACES: per layer, the alpha (on a grid of 21 values) whose
rank-k truncation keeps the largest share of the target's output energy ||W'(alpha) X~|| /
||W*(alpha) X~||, so the rank is spent on a target that is low-rank enough to be kept. The paper
publishes no code; the grid and the tie rule (the smallest alpha among equal ratios) are ours.
Measured on AUSTEN-512 at ratio 0.6 (docs/recipes.md), a fixed alpha of 0.25 is far better than
both full compensation and this adaptive choice, so 0.25 is the recipe's default.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .stats import forward_hooks

__all__ = ["CrossCollector", "CompensatedTarget", "compensated_target", "adaptive_strength", "RIDGE", "STRENGTHS"]

#: Relative ridge on the compressed inputs' Gram matrix before it is inverted.
RIDGE = 1e-4

#: The strengths ``compensation: adaptive`` chooses from (0 is the plain target, 1 full compensation).
STRENGTHS = tuple(i / 20 for i in range(21))


@dataclass
class CrossCollector:
    """Forward hooks that accumulate sum_t x_t x~_t^T for every targeted layer.

    Per batch, the block first runs on the original hidden states while ``recording`` (each layer's
    input is kept), then on the compressed ones (each layer's input is multiplied with the kept
    one). Layers that share an input compute the same sum; it is cheap next to the block's forward.
    """

    recording: bool = False
    seconds: float = 0.0   # the pairing GEMMs only (statistics time)
    _kept: dict[str, torch.Tensor] = field(default_factory=dict)
    _cross: dict[str, torch.Tensor] = field(default_factory=dict)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            if self.recording:   # a copy, part of the original stream's pass
                self._kept[name] = x.clone()
                return
            start = time.perf_counter()
            original = self._kept.pop(name)
            acc = self._cross.get(name)
            if acc is None:
                acc = self._cross[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            acc.addmm_(original.T, x)
            self.seconds += time.perf_counter() - start

        return hook

    @contextmanager
    def attached(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """Hooks on ``modules`` (by full name) for the ``with`` body; kept inputs are dropped after."""
        try:
            with forward_hooks(modules, self._hook):
                yield
        finally:
            self._kept.clear()

    @contextmanager
    def original_stream(self) -> Iterator[None]:
        """While the block runs on the original hidden states: keep each layer's input."""
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def cross(self, name: str) -> torch.Tensor | None:
        """sum x x~^T of layer ``name`` in float64, or None when nothing was paired."""
        acc = self._cross.get(name)
        return None if acc is None else acc.to(torch.float64)


@dataclass(frozen=True)
class CompensatedTarget:
    """The matrix a layer is fitted to, W + strength x D, with the strength used and any note."""

    weight: torch.Tensor
    strength: float
    note: str | None = None


def compensated_target(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, strength: float | None = 1.0,
                       rank: int | None = None) -> CompensatedTarget:
    """W* = W + alpha W (M - C)(C + lambda I)^-1 in float64.

    Args:
        weight: W, out x in.
        cross: M = sum x x~^T, in x in.
        gram: C = sum x~ x~^T, in x in.
        strength: alpha in [0, 1]; ``None`` chooses it per layer (:func:`adaptive_strength`).
        rank: the rank the layer will keep (needed when ``strength`` is ``None``).
    """
    n = gram.shape[0]
    scale = float(gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    ridge, note = RIDGE, None
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(gram + ridge * scale * eye)
        if int(info) == 0:
            break
        ridge *= 10.0
        note = f"compensated target: ridge raised to {ridge:g} x mean diagonal (inputs' Gram not positive definite)"
    else:
        return CompensatedTarget(weight, 0.0, "compensated target: Gram not positive definite even with a large ridge; "
                                              "plain target used")
    # D (C + lambda I) = W (M - C)  <=>  (C + lambda I) D^T = (M - C)^T W^T (C symmetric)
    correction = torch.cholesky_solve((cross - gram).T @ weight.T, factor).T
    if strength is None:
        if rank is None:
            raise ValueError("compensation: adaptive needs the layer's rank")
        strength = adaptive_strength(weight, correction, factor, rank)
    return CompensatedTarget(weight + strength * correction, float(strength), note)


def adaptive_strength(weight: torch.Tensor, correction: torch.Tensor, factor: torch.Tensor, rank: int) -> float:
    """SAES-SVD's ACES as we read it: the alpha in ``STRENGTHS`` that maximises the share of the output energy of
    W + alpha D on X~ that its best rank-``rank`` approximation keeps.

    With L the Cholesky factor of X~'s Gram, ||W' X~||^2 = ||W' L||^2, so the share is the sum of the
    ``rank`` largest eigenvalues of G(alpha) = T T^T (T = (W + alpha D) L, the smaller side) over its
    trace; G(alpha) = PP + alpha (PQ + QP) + alpha^2 QQ is formed once.
    """
    if rank >= min(weight.shape):
        return 1.0   # nothing is truncated: the full target is kept exactly
    p, q = weight @ factor, correction @ factor
    if p.shape[0] > p.shape[1]:
        p, q = p.T, q.T
    pp, qq, pq = p @ p.T, q @ q.T, p @ q.T
    mixed = pq + pq.T
    best, best_share = 0.0, -1.0
    for alpha in STRENGTHS:
        eig = torch.linalg.eigvalsh(pp + alpha * mixed + alpha * alpha * qq).clamp_min(0)
        total = float(eig.sum())
        share = float(eig[-rank:].sum()) / total if total > 0 else 1.0
        if share > best_share * (1 + 1e-12):
            best, best_share = alpha, share
    return best
