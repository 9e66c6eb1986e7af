"""Rank allocators: which singular components each matrix keeps under a parameter budget.

An allocator sees every matrix's spectrum in its scaled coordinates (and optional per-component
scores) and returns a :class:`Selection` per matrix: usually a prefix of the spectrum (rank k), but
any set of components with an optional rescaling per kept component is allowed.
"""

from __future__ import annotations

from abc import abstractmethod
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Literal, Sequence

import torch

from ._strategy import Strategy

if TYPE_CHECKING:
    from ._factorize import ScaledSVD
    from ._refine import ModelContext, RefineContext

# A component scorer turns one calibration batch's loss gradient for W (out x in, float32) into
# one score per singular component; the pipeline averages the scores over the batches.
ComponentScorer = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "MatrixSpectrum",
    "Selection",
    "Budget",
    "Allocator",
    "factored_params",
    "breakeven_rank",
    "stored_params",
    "floor_tolerant",
]


def floor_tolerant(x: float) -> int:
    """floor(x), forgiving the round-off of products such as 400 * (1 - 0.9) = 39.99999999999999."""
    return math.floor(x + 1e-12 * max(1.0, abs(x)))


def factored_params(m: int, n: int, k: int) -> int:
    """Parameters of an (m x k)(k x n) factorization."""
    return k * (m + n)


def breakeven_rank(m: int, n: int) -> int:
    """Largest rank whose factors are strictly smaller than the dense m x n matrix."""
    return (m * n - 1) // (m + n)


def stored_params(m: int, n: int, k: int | None) -> int:
    """Parameters actually stored: factors when they save something, else the dense matrix."""
    if k is None or k > breakeven_rank(m, n):
        return m * n
    return factored_params(m, n, k)


@dataclass(frozen=True)
class MatrixSpectrum:
    """What an allocator knows about one targeted matrix.

    Attributes:
        name: module name in the model.
        shape: (out, in) = (m, n).
        singular_values: descending, float64, length min(m, n), in the scaled coordinates.
        scores: optional per-component scores (same length), e.g. predicted loss changes.
        block: index of the decoder block.
    """

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    scores: torch.Tensor | None = None
    block: int = 0

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class Selection:
    """The components one matrix keeps.

    ``indices`` index the descending spectrum (``None`` keeps the matrix dense). ``rescale``
    multiplies each kept singular value (``None`` keeps them as they are).
    """

    indices: tuple[int, ...] | None
    rescale: tuple[float, ...] | None = None

    @classmethod
    def prefix(cls, k: int) -> "Selection":
        return cls(tuple(range(max(int(k), 0))))

    @classmethod
    def dense(cls) -> "Selection":
        return cls(None)

    @property
    def is_dense(self) -> bool:
        return self.indices is None

    @property
    def rank(self) -> int | None:
        return None if self.indices is None else len(self.indices)

    @property
    def is_prefix(self) -> bool:
        return self.indices is not None and self.indices == tuple(range(len(self.indices)))

    def params(self, shape: tuple[int, int]) -> int:
        return stored_params(shape[0], shape[1], self.rank)


@dataclass(frozen=True)
class Budget:
    """The parameter budget: remove ``ratio`` of the targeted matrices' parameters."""

    ratio: float
    dense_params: int

    @property
    def allowed_params(self) -> int:
        """Most parameters the allocated matrices may store."""
        return floor_tolerant(self.dense_params * (1.0 - self.ratio))


class Allocator(Strategy):
    """Decides the kept components of every matrix.

    ``scope = "matrix"`` means each matrix's decision depends only on that matrix (the pipeline then
    allocates block by block in one pass). ``scope = "global"`` means the decision needs every
    matrix's spectrum: the pipeline first profiles the whole model, allocates, then compresses.
    """

    kind: ClassVar[str] = "allocator"
    scope: ClassVar[Literal["matrix", "global"]] = "matrix"

    def rank_hint(self, shape: tuple[int, int], ratio: float) -> int | None:
        """The rank this allocator will give a matrix of ``shape``, if known before its SVD."""
        return None

    # -- optional protocol of global allocators ---------------------------------------------------

    def prepare(self, context: "ModelContext") -> None:
        """Called once before planning with the model and the calibration windows (e.g. to measure
        each matrix's sensitivity). It must leave the model as it found it."""

    def component_scorer(self, spectrum: MatrixSpectrum, svd: "ScaledSVD") -> ComponentScorer | None:
        """Return a scorer to get per-component scores from calibration-loss gradients (or None).

        Called during the profiling pass, while the matrix's scaled SVD is at hand; the pipeline
        then runs one gradient pass and calls every scorer inside a gradient hook, so no
        model-sized gradient is held. The averaged scores arrive as ``MatrixSpectrum.scores``.
        """
        return None

    def gradient_windows(self) -> tuple[int, int] | None:
        """(windows, tokens per window) for the gradient pass; None uses the calibration windows."""
        return None

    @property
    def lean_gradients(self) -> bool:
        """Score inside a post-accumulate-grad hook and drop each gradient at once (no model-sized
        gradient held); False keeps a batch's gradients until its backward pass ends (to compare)."""
        return True

    @property
    def stages(self) -> int:
        """Planning stages; between two of them :meth:`refine` may change the weights."""
        return 1

    def refine(self, context: "RefineContext", plan: dict[str, Selection]) -> None:
        """Between stages: e.g. truncate to ``plan`` and correct the weights (ZS-SVD)."""

    @abstractmethod
    def allocate(self, spectra: Sequence[MatrixSpectrum], budget: Budget) -> list[Selection]:
        """One :class:`Selection` per spectrum, in order, within ``budget``."""
