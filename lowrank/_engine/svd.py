"""The thin SVD of one scaled matrix, in the cheapest form that is exact enough.

The factorization is the bottleneck of a compression on every machine, so each matrix is factored
once, by one of two routes, and the report says which ran:

- ``gram-eigh`` (the fast route): the eigendecomposition of the smaller Gram matrix, W^T W or
  W W^T (min(m, n) squared), in float64, then the other side's singular vectors by one product
  (u_i = W v_i / sigma_i). A symmetric eigensolver on the small side is several times faster than
  LAPACK's SVD of the full rectangle. Its error in component i is about eps64 (sigma_1 / sigma_i)^2
  relative, so it is accepted only when every component that must be accurate has
  sigma_i / sigma_1 >= ``GRAM_MIN_RATIO`` (1e-5: relative error below 1e-6). The engine asks for
  the kept components when the rank is known before the SVD (uniform allocation), else for every
  component up to the break-even rank r* (a matrix that keeps more is stored dense); a caller that
  asks for nothing in particular gets every component accurate.
- ``svd`` (the exact route): LAPACK's SVD in float64 (gesdd, then gesvd if it fails to converge),
  for the matrices that fail that test: ill-conditioned in the range that matters, detected from
  the fast route's own spectrum, not guessed.

Components with sigma_i = 0 get zero singular vectors on the fast route (any orthonormal choice
would do: they contribute nothing to a factor, a score or an error).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .._contract.accounting import breakeven_rank
from .device import synchronize

__all__ = ["ThinSVD", "thin_svd", "needed_components", "GRAM_MIN_RATIO"]

#: Smallest sigma_i / sigma_1 among the components that matter for which the Gram route is exact
#: enough (relative error of sigma_i about eps64 / ratio^2 = 2e-6 at the threshold).
GRAM_MIN_RATIO = 1e-5


@dataclass
class ThinSVD:
    """W = U diag(S) Vh with S descending, and how it was computed."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    method: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def needed_components(shape: tuple[int, int], rank: int | None) -> int:
    """How many leading components a compression needs accurate: the kept ones when the rank is
    known, else every one up to the break-even rank (a matrix that keeps more stays dense)."""
    full = min(shape)
    if rank is not None:
        return max(1, min(int(rank), full))
    return max(1, min(breakeven_rank(*shape), full))


def _gram_route(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = w.shape
    tall = m >= n
    gram = w.T @ w if tall else w @ w.T
    eigenvalues, vectors = torch.linalg.eigh(gram)
    s = eigenvalues.flip(0).clamp_min(0).sqrt()
    vectors = vectors.flip(1)
    alive = s > 0
    inverse = torch.where(alive, 1.0 / torch.where(alive, s, torch.ones_like(s)), torch.zeros_like(s))
    if tall:
        v = vectors
        u = (w @ v) * inverse[None, :]
    else:
        u = vectors
        v = (w.T @ u) * inverse[None, :]
    return u, s, v.T.contiguous()


def _lapack_route(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    try:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u, s, vh, []
    except RuntimeError:
        # gesdd can fail to converge on badly scaled input; gesvd is slower but robust.
        if w.is_cuda:
            u, s, vh = torch.linalg.svd(w, full_matrices=False, driver="gesvd")
        else:
            import numpy as np
            import scipy.linalg

            u_, s_, vh_ = scipy.linalg.svd(w.cpu().numpy(), full_matrices=False, lapack_driver="gesvd")
            u, s, vh = (torch.from_numpy(np.ascontiguousarray(a)).to(w.device) for a in (u_, s_, vh_))
        return u, s, vh, ["SVD fell back to the gesvd driver"]


def thin_svd(w: torch.Tensor, accurate: int | None = None, method: str = "auto") -> ThinSVD:
    """The thin SVD of ``w`` (float64), by the fast route when it is exact enough.

    Args:
        w: The (scaled) matrix, m x n, float64, finite.
        accurate: How many leading components must be accurate (None: all of them; see
            :func:`needed_components`).
        method: ``auto`` (fast route with the accuracy check), ``gram-eigh`` (fast route, no
            check) or ``svd`` (LAPACK's SVD).
    """
    if method not in ("auto", "gram-eigh", "svd"):
        raise ValueError(f"method: expected auto, gram-eigh or svd, got {method!r}")
    start = time.perf_counter()
    out = _thin_svd(w, min(w.shape) if accurate is None else accurate, method)
    synchronize(w.device)
    out.seconds = time.perf_counter() - start
    return out


def _thin_svd(w: torch.Tensor, accurate: int, method: str) -> ThinSVD:
    if method != "svd" and min(w.shape) > 0:
        try:
            u, s, vh = _gram_route(w)
        except RuntimeError:  # eigh failed to converge: the exact route below
            u = None
        if u is not None:
            needed = max(1, min(int(accurate), min(w.shape)))
            top = float(s[0])
            if method == "gram-eigh" or top == 0.0 or float(s[needed - 1]) >= GRAM_MIN_RATIO * top:
                return ThinSVD(u, s, vh, "gram-eigh")
    u, s, vh, notes = _lapack_route(w)
    return ThinSVD(u, s, vh, "svd", notes)
