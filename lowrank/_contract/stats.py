"""``LayerStats``: the calibration statistics of one layer's inputs, as a scaling receives them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .operators import Transform

if TYPE_CHECKING:
    from .blocks import BlockContext

__all__ = ["LayerStats", "STATISTICS"]

#: Statistics the engine knows how to collect for a layer (names a scaling puts in ``requires``).
#: The Gram matrix (sum of x x^T) and the token count are always collected: the report's
#: activation-norm error needs them.
STATISTICS = frozenset({"gram", "abs_mean", "inputs", "grad_row_sq", "grad_col_sq", "block"})


@dataclass
class LayerStats:
    """Calibration statistics of one layer's inputs, in float64 on the compute device.

    The optional fields are filled only when a scaling of the recipe names them in ``requires``.

    Attributes:
        gram: Sum over tokens of x x^T (n x n), in the current (possibly scaled) coordinates.
        n_tokens: Number of tokens accumulated.
        abs_mean: Per-channel mean |x| (n,), when collected and still meaningful (a non-diagonal
            right transform makes it unavailable).
        inputs: The raw inputs (tokens x n), in the current coordinates.
        grad_row_sq: Squared calibration-loss gradients of W summed per row over batches (m,).
        grad_col_sq: The same summed per column (n,).
        block: The decoder block around the layer, to evaluate a candidate weight on the block's
            outputs (a :class:`~lowrank.BlockContext`).
        cache: Per-input scratch space shared by layers that read the same input (q/k/v share one
            Gram matrix), so a strategy can compute e.g. a Cholesky factor once for all of them.
        prior: The transforms of the scalings applied before this one, in order (W_in = L W R).
    """

    gram: torch.Tensor
    n_tokens: int
    abs_mean: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    grad_row_sq: torch.Tensor | None = None
    grad_col_sq: torch.Tensor | None = None
    block: "BlockContext | None" = None
    cache: dict[Any, Any] = field(default_factory=dict)
    prior: list[Transform] = field(default_factory=list)

    @property
    def covariance(self) -> torch.Tensor:
        """gram / n_tokens: the uncentred second moment of the inputs."""
        return self.gram / max(self.n_tokens, 1)

    def transformed(self, t: Transform) -> "LayerStats":
        """Statistics of the inputs seen by L W R: x' = R^-1 x.

        ``prior`` gains ``t``: a later scaling that evaluates the layer in its original coordinates
        (through the block) maps back with the transforms applied before it. Row statistics
        (``grad_row_sq``) and the block carry over unchanged.
        """
        prior = [*self.prior, t]
        if t.right is None:
            return dataclasses.replace(self, prior=prior)  # shares the gram matrix and the cache
        r = t.right
        gram = r.inv_t_right(r.inv_left(self.gram))  # R^-1 G R^-T
        gram = 0.5 * (gram + gram.T)
        abs_mean = self.abs_mean / r.d.abs() if (self.abs_mean is not None and r.is_diagonal) else None  # type: ignore[attr-defined]
        inputs = None if self.inputs is None else r.inv_left(self.inputs.T.to(r.matrix().dtype)).T
        return LayerStats(gram, self.n_tokens, abs_mean, inputs, self.grad_row_sq, None, self.block,
                          prior=prior)
