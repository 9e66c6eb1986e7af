"""Invertible linear maps (operators) and the transform a scaling returns.

A scaling returns a :class:`Transform` (L, R): the SVD is taken of L W R, and the exact inverses
are folded into the factors, A = L^-1 U_k S_k^1/2 and B = S_k^1/2 V_k^T R^-1, so inference costs
nothing extra. Operators know how to act from either side and how to invert themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

__all__ = ["Operator", "Diagonal", "Triangular", "Dense", "Transform", "SpectrumChange"]


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


@dataclass(frozen=True)
class SpectrumChange:
    """How a learned scaling changed a matrix's spectrum (reported per matrix).

    Attributes:
        effective_rank_before: Entropy effective rank of the spectrum the scaling received.
        effective_rank_after: The same measure of the learned scaled matrix.
        participation_ratio_before: Participation ratio of the spectrum the scaling received.
        participation_ratio_after: The same measure of the learned scaled matrix.
    """

    effective_rank_before: float
    effective_rank_after: float
    participation_ratio_before: float
    participation_ratio_after: float


@dataclass
class Transform:
    """The pair (L, R) a scaling returns; ``None`` means identity on that side."""

    left: Operator | None = None
    right: Operator | None = None
    notes: list[str] = field(default_factory=list)
    # numbers a scaling reports about this matrix (e.g. a learned scaling's loss before and after
    # learning); they end up in the report's MatrixReport.diagnostics as "<scaling>.<key>"
    diagnostics: dict[str, float] = field(default_factory=dict)
    spectrum_change: "SpectrumChange | None" = None

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
