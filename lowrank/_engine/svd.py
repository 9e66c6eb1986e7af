"""The thin SVD of one scaled matrix, in the cheapest form that is exact enough.

The factorization is the bottleneck of a compression on every machine, so each matrix is factored
once, by one of three routes, and the report says which ran:

- ``gram-eigh`` (the fast route): the eigendecomposition of the smaller Gram matrix, W^T W or
  W W^T (min(m, n) squared), in float64, then the other side's singular vectors by one product
  (u_i = W v_i / sigma_i). A symmetric eigensolver on the small side is several times faster than
  LAPACK's SVD of the full rectangle. Its error in component i is about eps64 (sigma_1 / sigma_i)^2
  relative, so it is accepted only when every component that must be accurate has
  sigma_i / sigma_1 >= ``GRAM_MIN_RATIO`` (1e-5: relative error below 1e-6). The engine asks for
  the kept components when the rank is known before the SVD (uniform allocation), else for every
  component up to the break-even rank r* (a matrix that keeps more is stored dense); a caller that
  asks for nothing in particular gets every component accurate.
- ``randomized`` (only with ``method="randomized"``, the recipe's ``factorization: randomized``):
  the k = ``accurate`` leading components by a randomized range finder with subspace iteration
  (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1), in float64, where that is checked to be
  as exact as the Gram route and predicted to be cheaper than its eigenvectors. Below.
- ``svd`` (the exact route): LAPACK's SVD in float64 (gesdd, then gesvd if it fails to converge),
  for the matrices that fail that test: ill-conditioned in the range that matters, detected from
  the fast route's own spectrum, not guessed.

Components with sigma_i = 0 get zero singular vectors on the fast route (any orthonormal choice
would do: they contribute nothing to a factor, a score or an error).

The randomized route:

- **What it returns.** Singular vectors for the k leading components only (u: m x k, vh: k x n,
  what ``ScaledSVD.leading(k)`` keeps), but *every* singular value. The engine needs the whole
  spectrum: it is the allocator's ``MatrixSpectrum``, and the report's effective rank,
  participation ratio and dropped energy are computed from it. The tail energy
  ||W||_F^2 - sum_{i<k} sigma_i^2 would give the dropped energy, not the diagnostics, so the tail
  values are the square roots of the eigenvalues of the smaller Gram matrix (``eigvalsh``, no
  eigenvectors: a fraction of the eigendecomposition's time), which are exactly the values the
  Gram route reports for those components. The k leading values are the randomized ones.
- **When it is tried.** With ``method="randomized"`` only, and only where k <= min(m, n) / 4 and
  min(m, n) >= 2048 (``_worth_trying``: below that size it lost to the Gram route in the benchmark;
  the fraction keeps it off every break-even request, which asks for about min(m, n) / 2
  components). Then the Gram matrix and its eigenvalues are computed; if
  sigma_k / sigma_1 < ``GRAM_MIN_RATIO`` the matrix goes to LAPACK (the Gram route would fail the
  same test), otherwise the spectrum predicts how many subspace iterations each block size needs
  (the error of component k shrinks like (sigma_{l+1} / sigma_k)^(2t+1) with block l and t
  iterations) and a flop model measured on the CPU (``_randomized_plan``) compares the cheapest
  plan with what the Gram route still has to do (eigenvectors, one product); the Gram route runs,
  on the Gram matrix already formed, when the plan is not cheaper.
- **The check** (detected, not guessed). Rayleigh-Ritz on the block gives triplets with
  W^T u_i = s_i v_i exactly, so each is an exact singular triplet of a matrix within
  ||W v_i - s_i u_i|| of W; the route is accepted when that residual is at most
  ``RANDOMIZED_TOL`` (1e-6) s_i for every i < k, and when every s_i agrees with the Gram spectrum
  to ``RANDOMIZED_MATCH`` (1e-5, the Gram values being exact to about 2e-6 there): a component the
  range finder missed would shift every later s_i onto the next singular value. Otherwise the Gram
  route runs, with a note.
- **Deterministic.** The test matrix comes from a CPU generator seeded with a constant
  (``RANDOMIZED_SEED``), then moves to the matrix's device: the same draw on every run and device.
- **Why not in ``auto``.** On the scaled weights of real models the kept rank falls where the
  spectrum decays slowly (sigma_{2k+1} / sigma_k from 0.42 to 0.69 on SmolLM2's whitened matrices
  at ratios 0.6 and 0.8), so the tolerance takes 9 to 22 iterations and the plan is never cheaper;
  trying it on every eligible matrix would add one eigenvalue pass to each for nothing (3 % to 25 %
  of the Gram route's time at the Llama-8B shapes, ``bench/results/svd-routes-cpu.md``). It pays
  on matrices with a gap at the kept rank (low rank plus noise: 0.42x the Gram route's time at
  4096 x 4096, 0.70x at 4096 x 14336), which a user who knows their weights can ask for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .._contract.accounting import breakeven_rank
from .device import synchronize

__all__ = ["ThinSVD", "thin_svd", "needed_components", "GRAM_MIN_RATIO", "RANDOMIZED_TOL", "RANDOMIZED_MATCH",
           "METHODS"]

#: Smallest sigma_i / sigma_1 among the components that matter for which the Gram route is exact
#: enough (relative error of sigma_i about eps64 / ratio^2 = 2e-6 at the threshold).
GRAM_MIN_RATIO = 1e-5
#: The randomized route's acceptance: ||W v_i - s_i u_i|| <= RANDOMIZED_TOL * s_i for i < k ...
RANDOMIZED_TOL = 1e-6
#: ... and |s_i - sigma_i| <= RANDOMIZED_MATCH * sigma_i against the Gram matrix's spectrum.
RANDOMIZED_MATCH = 1e-5
#: The routes ``thin_svd`` takes as ``method``.
METHODS = ("auto", "gram-eigh", "randomized", "svd")

#: The range finder's draw: a constant, so that every run gives the same bits.
RANDOMIZED_SEED = 0
# k <= min(m, n) / 4 keeps the route off break-even requests (about min(m, n) / 2 components, the
# planner's profiles, whose allocators score every component) and off ranks where only a matrix of
# almost exactly that rank could pay back the eigenvalue pass.
_MAX_FRACTION = 0.25
# Below min(m, n) = 2048 the range finder's thin products and QRs run too far below the GEMM rate
# for the flop model: measured (gapped spectra, ratio 0.8, one thread) it took 2.7x the Gram route's
# time at 576 x 1536 and 1.4x at 1024 x 4096, 0.8x at 1024 x 1024, 0.6x at 2048 x 2048.
_MIN_SIDE = 2048
_MAX_ITERATIONS = 30
_SAFETY = 10.0            # the predicted residual ratio^(2t+1) aims 10x below the tolerance
# Flop model, in flop-equivalents of a float64 GEMM (MKL, one thread of the benchmark's CPU, where
# a GEMM ran at 29-38 GFlop/s): the eigenvectors of a symmetric r x r matrix cost about 12 r^3
# beyond its eigenvalues (r = 4096: eigh 25.3 s, eigvalsh 3.8 s, the Gram product 3.6 s), a
# Householder QR of an m x l block about 7 m l^2 (6.4-7.4 for 4096 x 552 to 14336 x 796), the SVD
# of an l x l matrix about 24 l^3.
_EIGH_VECTORS = 12.0
_QR = 7.0
_SMALL_SVD = 24.0


@dataclass
class ThinSVD:
    """W = U diag(S) Vh with S descending, and how it was computed.

    ``s`` holds every singular value; ``u`` and ``vh`` may hold the leading components only (the
    randomized route: ``u.shape[1]`` of them)."""

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


def _gram(w: torch.Tensor) -> torch.Tensor:
    return w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T


def _gram_route(w: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tall = w.shape[0] >= w.shape[1]
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


@dataclass(frozen=True)
class _Plan:
    """A range finder with ``block`` columns and ``iterations`` subspace iterations."""

    block: int
    iterations: int
    cost: float   # flop-equivalents (the model above)


def _worth_trying(shape: tuple[int, int], k: int) -> bool:
    return min(shape) >= _MIN_SIDE and k <= _MAX_FRACTION * min(shape)


def _iterations(ratio: float) -> int | None:
    """Subspace iterations t with ratio^(2t+1) <= RANDOMIZED_TOL / _SAFETY (None: more than the cap)."""
    if ratio <= 0.0:
        return 0
    if ratio >= 1.0:
        return None
    t = max(0, math.ceil((math.log(RANDOMIZED_TOL / _SAFETY) / math.log(ratio) - 1) / 2))
    return t if t <= _MAX_ITERATIONS else None


def _randomized_plan(sigma: torch.Tensor, k: int, shape: tuple[int, int]) -> _Plan | None:
    """The cheapest range finder for the k leading components of a matrix with spectrum ``sigma``,
    when it is cheaper than the rest of the Gram route (None otherwise)."""
    m, n = shape
    r = sigma.numel()
    gram_rest = 2.0 * m * n * r + _EIGH_VECTORS * r ** 3   # eigenvectors, then u = W v / sigma
    best = None
    for block in sorted({min(r, k + p) for p in (max(8, k // 4), k // 2, k, 2 * k)}):
        ratio = float(sigma[block] / sigma[k - 1]) if block < r else 0.0
        t = _iterations(ratio)
        if t is None:
            continue
        # 2t + 3 products with W (the draw, t round trips, Rayleigh-Ritz, the residual), t + 1 QRs
        # on each side, one small SVD
        cost = ((2 * t + 3) * 2.0 * m * n * block + (t + 1) * _QR * (m + n) * block ** 2
                + _SMALL_SVD * block ** 3)
        if cost < gram_rest and (best is None or cost < best.cost):
            best = _Plan(block, t, cost)
    return best


def _range_finder(w: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz triplets (u, s, vh) of ``w`` on a ``plan.block``-dimensional subspace."""
    g = torch.Generator().manual_seed(RANDOMIZED_SEED)
    omega = torch.randn(w.shape[1], plan.block, generator=g, dtype=w.dtype).to(w.device)
    q = torch.linalg.qr(w @ omega).Q
    for _ in range(plan.iterations):
        # orthonormalize after every product: powers of W would collapse the block onto the
        # leading singular vector in floating point (HMT algorithm 4.4)
        q = torch.linalg.qr(w @ torch.linalg.qr(w.T @ q).Q).Q
    # Rayleigh-Ritz, the best pairs in span(q): q^T W = R^T Z^T with W^T q = Z R, then the SVD of
    # the small R^T (LAPACK's SVD of the wide l x n q^T W directly was 4x slower)
    z, r = torch.linalg.qr(w.T @ q)
    ur, s, vhr = torch.linalg.svd(r.T)
    return q @ ur, s, vhr @ z.T


def _randomized_route(w: torch.Tensor, sigma: torch.Tensor, k: int, plan: _Plan) -> tuple[ThinSVD | None, str]:
    """The route's result when its check accepts it, else None and why."""
    u, s, vh = _range_finder(w, plan)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    # W^T u_i = s_i v_i holds by construction (q^T W = U_r S Vh): only the other side can fail
    residual = float(((w @ vh.T - u * s).norm(dim=0) / s).max())
    mismatch = float(((s - sigma[:k]).abs() / sigma[:k]).max())
    if not (residual <= RANDOMIZED_TOL and mismatch <= RANDOMIZED_MATCH):   # also catches NaN
        return None, (f"randomized: rejected by its check (residual {residual:.1e} of sigma, spectrum mismatch "
                      f"{mismatch:.1e}; block {plan.block}, {plan.iterations} iterations), Gram route instead")
    tail = sigma[k:].clamp_max(s[-1])   # rounding can put sigma_k a hair above the checked s_{k-1}
    return ThinSVD(u.contiguous(), torch.cat([s, tail]), vh.contiguous(), "randomized"), ""


def thin_svd(w: torch.Tensor, accurate: int | None = None, method: str = "auto") -> ThinSVD:
    """The thin SVD of ``w`` (float64), by the fast route when it is exact enough.

    Args:
        w: The (scaled) matrix, m x n, float64, finite.
        accurate: How many leading components must be accurate (None: all of them; see
            :func:`needed_components`).
        method: ``auto`` (fast route with the accuracy check), ``gram-eigh`` (fast route, no
            check), ``randomized`` (``auto``, with the randomized route first where it is
            predicted cheaper and its check passes; it returns singular vectors for the
            ``accurate`` leading components only) or ``svd`` (LAPACK's SVD).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    start = time.perf_counter()
    out = _thin_svd(w, min(w.shape) if accurate is None else accurate, method)
    synchronize(w.device)
    out.seconds = time.perf_counter() - start
    return out


def _thin_svd(w: torch.Tensor, accurate: int, method: str) -> ThinSVD:
    notes: list[str] = []
    if method != "svd" and min(w.shape) > 0:
        needed = max(1, min(int(accurate), min(w.shape)))
        gram = _gram(w)
        if method == "randomized" and _worth_trying(tuple(w.shape), needed):
            try:
                sigma = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()
            except RuntimeError:  # the eigensolver failed to converge: the exact route below
                return _exact(w, notes)
            top = float(sigma[0])
            if top > 0.0 and float(sigma[needed - 1]) < GRAM_MIN_RATIO * top:
                return _exact(w, notes)   # the Gram route's own test, on the same eigenvalues
            plan = _randomized_plan(sigma, needed, tuple(w.shape)) if top > 0.0 else None
            if plan is not None:
                out, note = _randomized_route(w, sigma, needed, plan)
                if out is not None:
                    return out
                notes.append(note)
        try:
            u, s, vh = _gram_route(w, gram)
        except RuntimeError:  # eigh failed to converge: the exact route below
            u = None
        if u is not None:
            top = float(s[0])
            if method == "gram-eigh" or top == 0.0 or float(s[needed - 1]) >= GRAM_MIN_RATIO * top:
                return ThinSVD(u, s, vh, "gram-eigh", notes)
    return _exact(w, notes)


def _exact(w: torch.Tensor, notes: list[str]) -> ThinSVD:
    u, s, vh, more = _lapack_route(w)
    return ThinSVD(u, s, vh, "svd", notes + more)
