"""Parameter accounting: what a factorization stores, and when factoring stops paying.

Every allocator, the report and the exporters count parameters with these four functions, so the
ratio convention (``docs/ratio.md``) lives in one place: a recipe's ratio is the fraction of the
targeted matrices' parameters removed, and a matrix whose factors would not be smaller than the
dense matrix is stored dense.
"""

from __future__ import annotations

import math

__all__ = ["floor_tolerant", "factored_params", "breakeven_rank", "stored_params", "uniform_rank"]


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


def uniform_rank(shape: tuple[int, int], ratio: float) -> int:
    """k = floor(m n (1 - r) / (m + n)): the rank that removes the fraction r of an m x n matrix."""
    m, n = shape
    return min(floor_tolerant(m * n * (1.0 - ratio) / (m + n)), min(m, n))
