"""The value types an allocator works with: a matrix's spectrum, the components it keeps, the budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .accounting import floor_tolerant, stored_params

__all__ = ["MatrixSpectrum", "Selection", "Budget"]


@dataclass(frozen=True)
class MatrixSpectrum:
    """What an allocator knows about one targeted matrix.

    Attributes:
        name: Module name in the model.
        shape: (out, in) = (m, n).
        singular_values: Descending, length min(m, n), in the scaled coordinates.
        scores: Optional per-component scores (same length), e.g. predicted loss changes.
        block: Index of the decoder block.
    """

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    scores: torch.Tensor | None = None
    block: int = 0

    @property
    def full_rank(self) -> int:
        """min(m, n)."""
        return min(self.shape)

    @property
    def dense_params(self) -> int:
        """m * n."""
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class Selection:
    """The components one matrix keeps.

    Attributes:
        indices: Indices into the descending spectrum; ``None`` keeps the matrix dense.
        rescale: A factor per kept singular value; ``None`` keeps them as they are.
    """

    indices: tuple[int, ...] | None
    rescale: tuple[float, ...] | None = None

    @classmethod
    def prefix(cls, k: int) -> "Selection":
        """The k largest components (plain truncation)."""
        return cls(tuple(range(max(int(k), 0))))

    @classmethod
    def dense(cls) -> "Selection":
        """Keep the matrix as it is."""
        return cls(None)

    @property
    def is_dense(self) -> bool:
        """Whether the matrix stays dense."""
        return self.indices is None

    @property
    def rank(self) -> int | None:
        """Number of kept components (``None`` when dense)."""
        return None if self.indices is None else len(self.indices)

    @property
    def is_prefix(self) -> bool:
        """Whether the kept components are the leading ones."""
        return self.indices is not None and self.indices == tuple(range(len(self.indices)))

    def params(self, shape: tuple[int, int]) -> int:
        """Parameters stored for a matrix of ``shape`` (dense when factoring would not save)."""
        return stored_params(shape[0], shape[1], self.rank)

    def stays_dense(self, shape: tuple[int, int]) -> bool:
        """True when this selection stores the matrix dense (explicitly, or past break-even)."""
        return self.is_dense or self.params(shape) >= shape[0] * shape[1]


@dataclass(frozen=True)
class Budget:
    """The parameter budget: remove ``ratio`` of the targeted matrices' parameters.

    Attributes:
        ratio: Fraction of the targeted parameters removed, in (0, 1).
        dense_params: Parameters of the targeted matrices before compression.
    """

    ratio: float
    dense_params: int

    @property
    def allowed_params(self) -> int:
        """Most parameters the allocated matrices may store."""
        return floor_tolerant(self.dense_params * (1.0 - self.ratio))
