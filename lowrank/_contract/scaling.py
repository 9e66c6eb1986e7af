"""The scaling base: an invertible change of basis L W R applied before the SVD.

The SVD of the scaled matrix is truncated, then the exact inverses are folded into the factors:
A = L^-1 U_k S_k^1/2 and B = S_k^1/2 V_k^T R^-1, so inference costs nothing extra. Scalings stack:
the second one sees the first one's scaled weight and the statistics of the inputs in the scaled
coordinates (the Gram matrix becomes R^-1 G R^-T).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from .operators import Transform
from .stats import LayerStats
from .strategy import Strategy

__all__ = ["Scaling"]


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
