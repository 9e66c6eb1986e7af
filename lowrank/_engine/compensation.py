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
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .stats import forward_hooks

__all__ = ["CrossCollector", "compensated_weight", "RIDGE"]

#: Relative ridge on the compressed inputs' Gram matrix before it is inverted.
RIDGE = 1e-4


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


def compensated_weight(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """W* = W + W (M - C)(C + lambda I)^-1 (float64) and a note when the ridge had to grow past ``RIDGE``.

    Args:
        weight: W, out x in.
        cross: M = sum x x~^T, in x in.
        gram: C = sum x~ x~^T, in x in.
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
        return weight, "compensated target: Gram not positive definite even with a large ridge; plain target used"
    # D (C + lambda I) = W (M - C)  <=>  (C + lambda I) D^T = (M - C)^T W^T (C symmetric)
    correction = torch.cholesky_solve((cross - gram).T @ weight.T, factor).T
    return weight + correction, note
