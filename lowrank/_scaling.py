"""Scaling strategies: an invertible change of basis L W R applied before the SVD.

The SVD of the scaled matrix is truncated, then the exact inverses are folded into the factors:
A = L^-1 U_k S_k^1/2 and B = S_k^1/2 V_k^T R^-1, so inference costs nothing extra. Scalings stack:
the second one sees the first one's scaled weight and the statistics of the inputs in the scaled
coordinates (the Gram matrix becomes R^-1 G R^-T).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ._strategy import Strategy

__all__ = [
    "Operator",
    "Diagonal",
    "Triangular",
    "Dense",
    "Transform",
    "LayerStats",
    "Scaling",
    "STATISTICS",
]

# Statistics the pipeline knows how to collect for a layer's inputs. The Gram matrix (sum of x x^T)
# and the token count are always collected: the report's activation-norm error needs them.
STATISTICS = frozenset({"gram", "abs_mean", "inputs", "grad_row_sq", "grad_col_sq", "block"})


class Operator(ABC):
    """An invertible d x d linear map that can act from either side."""

    size: int

    @abstractmethod
    def matrix(self) -> torch.Tensor: ...

    @abstractmethod
    def left(self, m: torch.Tensor) -> torch.Tensor:
        """op @ m"""

    @abstractmethod
    def right(self, m: torch.Tensor) -> torch.Tensor:
        """m @ op"""

    @abstractmethod
    def inv_left(self, m: torch.Tensor) -> torch.Tensor:
        """op^-1 @ m"""

    @abstractmethod
    def inv_right(self, m: torch.Tensor) -> torch.Tensor:
        """m @ op^-1"""

    def inv_t_left(self, m: torch.Tensor) -> torch.Tensor:
        """op^-T @ m (gradients move to scaled coordinates with the transposed inverses)."""
        return self.inv_right(m.T).T

    def inv_t_right(self, m: torch.Tensor) -> torch.Tensor:
        """m @ op^-T"""
        return self.inv_left(m.T).T

    @property
    def is_diagonal(self) -> bool:
        return False


@dataclass
class Diagonal(Operator):
    """diag(d) with d > 0 (or at least non-zero)."""

    d: torch.Tensor

    def __post_init__(self) -> None:
        self.size = self.d.numel()

    def matrix(self) -> torch.Tensor:
        return torch.diag(self.d)

    def left(self, m):
        return self.d[:, None] * m

    def right(self, m):
        return m * self.d[None, :]

    def inv_left(self, m):
        return m / self.d[:, None]

    def inv_right(self, m):
        return m / self.d[None, :]

    @property
    def is_diagonal(self) -> bool:
        return True


@dataclass
class Triangular(Operator):
    """A lower-triangular matrix (a Cholesky factor); inverses are triangular solves."""

    t: torch.Tensor

    def __post_init__(self) -> None:
        self.size = self.t.shape[0]

    def matrix(self):
        return self.t

    def left(self, m):
        return self.t @ m

    def right(self, m):
        return m @ self.t

    def inv_left(self, m):
        return torch.linalg.solve_triangular(self.t, m, upper=False)

    def inv_right(self, m):
        return torch.linalg.solve_triangular(self.t, m, upper=False, left=False)


@dataclass
class Dense(Operator):
    """A general invertible matrix with its inverse given (e.g. Q diag(sqrt(lambda)) from eigh)."""

    m_: torch.Tensor
    inverse: torch.Tensor

    def __post_init__(self) -> None:
        self.size = self.m_.shape[0]

    def matrix(self):
        return self.m_

    def left(self, m):
        return self.m_ @ m

    def right(self, m):
        return m @ self.m_

    def inv_left(self, m):
        return self.inverse @ m

    def inv_right(self, m):
        return m @ self.inverse


@dataclass
class Transform:
    """The pair (L, R) a scaling returns; ``None`` means identity on that side."""

    left: Operator | None = None
    right: Operator | None = None
    notes: list[str] = field(default_factory=list)
    # numbers a scaling reports about this matrix (a learned scaling: its loss and the spectrum's
    # effective rank before and after learning); they end up in the report's MatrixReport
    diagnostics: dict[str, float] = field(default_factory=dict)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        if self.left is not None:
            w = self.left.left(w)
        if self.right is not None:
            w = self.right.right(w)
        return w

    def undo(self, w: torch.Tensor) -> torch.Tensor:
        if self.left is not None:
            w = self.left.inv_left(w)
        if self.right is not None:
            w = self.right.inv_right(w)
        return w

    def gradient(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient for the scaled weight L W R given the gradient g for W: L^-T g R^-T."""
        if self.left is not None:
            g = self.left.inv_t_left(g)
        if self.right is not None:
            g = self.right.inv_t_right(g)
        return g


@dataclass
class LayerStats:
    """Calibration statistics of one layer's inputs, in float64 on the compute device.

    Attributes:
        gram: sum over tokens of x x^T (n x n), in the current (possibly scaled) coordinates.
        n_tokens: number of tokens accumulated.
        abs_mean: per-channel mean |x| (n,), when collected and still meaningful (a non-diagonal
            right transform makes it unavailable).
        extras: anything else a strategy asked for, by name (see ``STATISTICS``): ``inputs`` (the
            raw inputs, tokens x n), ``grad_row_sq``/``grad_col_sq`` (squared calibration-loss
            gradients summed per row/column over batches), ``block`` (a ``BlockContext``).
        cache: per-input scratch space shared by layers that read the same input (q/k/v share one
            Gram matrix), so a strategy can compute e.g. a Cholesky factor once for all of them.
        prior: the transforms of the scalings applied before this one, in order (W_in = L W R).
    """

    gram: torch.Tensor
    n_tokens: int
    abs_mean: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)
    prior: list[Transform] = field(default_factory=list)

    @property
    def covariance(self) -> torch.Tensor:
        """gram / n_tokens: the uncentred second moment of the inputs."""
        return self.gram / max(self.n_tokens, 1)

    def transformed(self, t: Transform) -> "LayerStats":
        """Statistics of the inputs seen by L W R: x' = R^-1 x.

        ``prior`` gains ``t``: a later scaling that evaluates the layer in its original coordinates
        (through the block) maps back with the transforms applied before it.
        """
        prior = [*self.prior, t]
        if t.right is None:
            return dataclasses.replace(self, prior=prior)  # shares the gram matrix and the cache
        r = t.right
        gram = r.inv_t_right(r.inv_left(self.gram))  # R^-1 G R^-T
        gram = 0.5 * (gram + gram.T)
        abs_mean = self.abs_mean / r.d.abs() if (self.abs_mean is not None and r.is_diagonal) else None  # type: ignore[attr-defined]
        extras = dict(self.extras)
        if "inputs" in extras:
            extras["inputs"] = r.inv_left(extras["inputs"].T.to(r.matrix().dtype)).T
        return LayerStats(gram, self.n_tokens, abs_mean, extras, prior=prior)


class Scaling(Strategy):
    """A change of basis before the SVD.

    Subclasses implement :meth:`fit`. ``requires`` names extra statistics (see ``STATISTICS``) the
    pipeline must collect for them.
    """

    kind: ClassVar[str] = "scaling"
    requires: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def fit(self, weight: torch.Tensor, stats: LayerStats, rank: int | None = None) -> Transform:
        """Return the transform for ``weight`` (out x in, float64) given its input ``stats``.

        ``rank`` is the rank the allocator will keep when it is known before the SVD (uniform
        allocation); learned scalings optimise for it, analytic ones ignore it.
        """

    def fit_batch(self, items: list[tuple[torch.Tensor, LayerStats, int | None]]) -> list[Transform]:
        """Fit several matrices of one block at once (same-shaped ones can share the work).

        The default fits them one by one; learned scalings override it to optimise in a batch.
        """
        return [self.fit(w, s, rank=r) for w, s, r in items]
