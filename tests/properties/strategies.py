"""Hypothesis strategies for the property tests: matrices and calibration inputs with controlled spectra.

Nothing here is filtered with ``assume`` and nothing uses an unseeded RNG: every tensor is built in
float64 from a drawn seed with ``torch.Generator().manual_seed(seed)``, so a failing example is
reproduced exactly from the drawn integers and floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
from hypothesis import strategies as st

from lowrank import LayerStats, MatrixSpectrum

DTYPE = torch.float64
U = torch.finfo(DTYPE).eps  # unit round-off of float64 (2.2e-16)

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
STYLES = ("logspace", "random")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """rows x cols with orthonormal columns (cols <= rows), Haar-distributed, from the QR of a Gaussian."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=DTYPE))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs[None, :]


def spectrum(k: int, kappa: float, style: str, g: torch.Generator) -> torch.Tensor:
    """k descending values in [1/kappa, 1] with max 1 and (for k >= 2) min 1/kappa."""
    if k == 0:
        return torch.zeros(0, dtype=DTYPE)
    lk = math.log(kappa)
    if style == "logspace" or k == 1:
        return torch.exp(-torch.linspace(0.0, lk, k, dtype=DTYPE))
    u = torch.rand(k, generator=g, dtype=DTYPE)
    u[0], u[-1] = 0.0, 1.0
    return torch.exp(-lk * u).sort(descending=True).values


def kappas(max_log10: float = 4.0):
    """A condition number, log-uniform in [1, 10^max_log10]."""
    return st.floats(0.0, max_log10, allow_nan=False).map(lambda e: 10.0 ** e)


# --------------------------------------------------------------------------------------------
# Weight matrices


@dataclass(frozen=True)
class Mat:
    """W = U diag(s) V^T with a known spectrum (all float64)."""

    w: torch.Tensor
    s: torch.Tensor
    kappa: float
    seed: int

    @property
    def m(self) -> int:
        return self.w.shape[0]

    @property
    def n(self) -> int:
        return self.w.shape[1]

    def __repr__(self) -> str:  # keep falsifying-example output readable
        return f"Mat(m={self.m}, n={self.n}, kappa={self.kappa:.3g}, seed={self.seed})"


def make_matrix(m: int, n: int, seed: int, kappa: float, style: str = "logspace") -> Mat:
    g = generator(seed)
    r = min(m, n)
    s = spectrum(r, kappa, style, g)
    u = orthonormal(m, r, g)
    v = orthonormal(n, r, g)
    return Mat((u * s[None, :]) @ v.T, s, kappa, seed)


@st.composite
def matrices(draw, min_dim: int = 2, max_dim: int = 40, max_log10_kappa: float = 4.0) -> Mat:
    m = draw(st.integers(min_dim, max_dim))
    n = draw(st.integers(min_dim, max_dim))
    return make_matrix(m, n, draw(SEEDS), draw(kappas(max_log10_kappa)), draw(st.sampled_from(STYLES)))


# --------------------------------------------------------------------------------------------
# Calibration inputs

FULL = "full"  # T >= n tokens, full row rank, covariance = U diag(sx^2) U^T exactly
FEW_TOKENS = "few_tokens"  # T < n: rank T
LOW_RANK = "low_rank"  # X = P Y with P of rank r < n, T >= n
DEAD_CHANNELS = "dead_channels"  # full-rank X with some input channels identically zero
ZERO = "zero"  # all-zero X, T > 0 tokens
EMPTY = "empty"  # no tokens at all (n_tokens = 0)
RANK_DEFICIENT = (FEW_TOKENS, LOW_RANK, DEAD_CHANNELS, ZERO, EMPTY)
ALL_KINDS = (FULL, *RANK_DEFICIENT)


@dataclass(frozen=True)
class Calib:
    """Calibration inputs X (n x T, columns are tokens) and their statistics."""

    x: torch.Tensor
    kind: str
    rank: int
    kappa: float
    seed: int

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.x.shape[1]

    @property
    def covariance(self) -> torch.Tensor:
        return (self.x @ self.x.T) / max(self.n_tokens, 1)

    def stats(self) -> LayerStats:
        """What the pipeline collects: gram = sum x x^T, the token count and the mean |x| per channel."""
        gram = self.x @ self.x.T
        abs_mean = self.x.abs().sum(1) / max(self.n_tokens, 1)
        return LayerStats(0.5 * (gram + gram.T), self.n_tokens, abs_mean)

    def __repr__(self) -> str:
        return (f"Calib(n={self.n}, T={self.n_tokens}, kind={self.kind!r}, rank={self.rank}, "
                f"kappa={self.kappa:.3g}, seed={self.seed})")


def _low_rank_x(n: int, t: int, r: int, kappa: float, scale: float, g: torch.Generator) -> torch.Tensor:
    """sqrt(T) * U_r diag(sx) V_r^T: rank r, covariance U_r diag(scale^2 sx^2) U_r^T exactly."""
    sx = spectrum(r, kappa, "random", g) * scale
    u = orthonormal(n, r, g)
    v = orthonormal(t, r, g)
    return math.sqrt(t) * (u * sx[None, :]) @ v.T


def make_calibration(n: int, kind: str, seed: int, kappa: float = 10.0, tokens: int = 0,
                     rank: int = 1, scale: float = 1.0) -> Calib:
    """Build X for ``kind``; ``tokens`` and ``rank`` are clipped to what the kind allows."""
    g = generator(seed)
    if kind == FULL:
        t = max(tokens, n)
        x, r = _low_rank_x(n, t, n, kappa, scale, g), n
    elif kind == FEW_TOKENS:
        t = min(max(tokens, 1), n - 1)
        x, r = _low_rank_x(n, t, t, kappa, scale, g), t
    elif kind == LOW_RANK:
        t = max(tokens, n)
        r = min(max(rank, 1), n - 1)
        x = _low_rank_x(n, t, r, kappa, scale, g)
    elif kind == DEAD_CHANNELS:
        t = max(tokens, n)
        x = _low_rank_x(n, t, n, kappa, scale, g)
        dead = min(max(rank, 1), n - 1)
        x[torch.randperm(n, generator=g)[:dead]] = 0.0
        r = n - dead
    elif kind == ZERO:
        t = max(tokens, 1)
        x, r = torch.zeros(n, t, dtype=DTYPE), 0
    elif kind == EMPTY:
        x, r = torch.zeros(n, 0, dtype=DTYPE), 0
    else:
        raise ValueError(kind)
    return Calib(x, kind, r, kappa, seed)


@st.composite
def calibrations(draw, n: int, kinds=ALL_KINDS, max_log10_kappa: float = 3.0) -> Calib:
    kind = draw(st.sampled_from(kinds))
    tokens = draw(st.integers(1, 3 * n))
    rank = draw(st.integers(1, max(n - 1, 1)))
    scale = 10.0 ** draw(st.floats(-2.0, 2.0, allow_nan=False))
    return make_calibration(n, kind, draw(SEEDS), draw(kappas(max_log10_kappa)), tokens, rank, scale)


@dataclass(frozen=True)
class Problem:
    mat: Mat
    calib: Calib


@st.composite
def problems(draw, kinds=ALL_KINDS, max_dim: int = 40, max_log10_kappa: float = 4.0,
             max_log10_kappa_x: float = 3.0) -> Problem:
    mat = draw(matrices(max_dim=max_dim, max_log10_kappa=max_log10_kappa))
    return Problem(mat, draw(calibrations(mat.n, kinds, max_log10_kappa_x)))


# --------------------------------------------------------------------------------------------
# Spectra for allocators


@st.composite
def matrix_spectra(draw, max_dim: int = 64, max_matrices: int = 6) -> list[MatrixSpectrum]:
    """1..max_matrices spectra: controlled, flat, with a zero tail, or all zero."""
    count = draw(st.integers(1, max_matrices))
    out = []
    for i in range(count):
        m = draw(st.integers(1, max_dim))
        n = draw(st.integers(1, max_dim))
        r = min(m, n)
        style = draw(st.sampled_from(("logspace", "random", "flat", "zero_tail", "zero")))
        g = generator(draw(SEEDS))
        kappa = draw(kappas(6.0))
        if style == "flat":
            s = torch.ones(r, dtype=DTYPE)
        elif style == "zero":
            s = torch.zeros(r, dtype=DTYPE)
        elif style == "zero_tail":
            s = spectrum(r, kappa, "random", g)
            s[draw(st.integers(0, r - 1)):] = 0.0
        else:
            s = spectrum(r, kappa, style, g)
        s = s * 10.0 ** draw(st.floats(-3.0, 3.0, allow_nan=False))
        out.append(MatrixSpectrum(f"block.{i}.proj", (m, n), s, block=i))
    return out


# Ratios: arbitrary floats and the round decimals people actually write in recipes.
RATIOS = st.one_of(
    st.floats(0.0, 0.99, allow_nan=False),
    st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95]),
)


def decimal(ratio: float) -> Fraction:
    """The ratio the user wrote: the shortest decimal that round-trips to the float, exactly."""
    return Fraction(repr(ratio))


# --------------------------------------------------------------------------------------------
# Linear-algebra helpers for the checks


def cond(m: torch.Tensor | None) -> float:
    """2-norm condition number (1 for None)."""
    if m is None or m.numel() == 0:
        return 1.0
    s = torch.linalg.svdvals(m)
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


def chain_matrices(transforms, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L W R the scaled weight, from the operators' explicit matrices."""
    left = torch.eye(m, dtype=DTYPE)
    right = torch.eye(n, dtype=DTYPE)
    for t in transforms:
        if t.left is not None:
            left = t.left.matrix() @ left
        if t.right is not None:
            right = right @ t.right.matrix()
    return left, right


def chain_cond(transforms, m: int, n: int) -> float:
    left, right = chain_matrices(transforms, m, n)
    return cond(left) * cond(right)


def dropped_energy(s: torch.Tensor, k: int) -> float:
    """Sum of the squared singular values beyond the first k."""
    return float(s[k:].pow(2).sum())


# --------------------------------------------------------------------------------------------
# Invertible operators


@st.composite
def operators(draw, n: int, kinds=("diagonal", "triangular", "dense"), max_log10_kappa: float = 3.0):
    """A Diagonal (mixed signs), Triangular (lower, positive diagonal) or Dense operator of size n,
    with condition number about kappa."""
    from lowrank import Dense, Diagonal, Triangular

    kind = draw(st.sampled_from(kinds))
    g = generator(draw(SEEDS))
    kappa = draw(kappas(max_log10_kappa))
    s = spectrum(n, kappa, "random", g)
    if kind == "diagonal":
        signs = torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0).to(DTYPE)
        return Diagonal(s[torch.randperm(n, generator=g)] * signs)
    q = orthonormal(n, n, g)
    if kind == "triangular":
        # Cholesky factor of an SPD matrix with eigenvalues s^2: condition number kappa.
        spd = (q * s.pow(2)[None, :]) @ q.T
        return Triangular(torch.linalg.cholesky(0.5 * (spd + spd.T)))
    return Dense(q * s[None, :], (q / s[None, :]).T)


def _warm_up() -> None:
    """Pay torch's one-time linear-algebra initialisation at import, not inside the first draw
    (which would trip Hypothesis' too_slow health check)."""
    g = generator(0)
    a = torch.randn(4, 3, generator=g, dtype=DTYPE)
    torch.linalg.qr(a)
    torch.linalg.svd(a, full_matrices=False)
    torch.linalg.svdvals(a)
    torch.linalg.eigvalsh(a.T @ a)
    torch.linalg.cholesky_ex(a.T @ a)
    torch.linalg.solve_triangular(torch.eye(3, dtype=DTYPE), a.T, upper=False)


_warm_up()


@pytest.fixture(autouse=True, scope="module")
def single_threaded_torch():
    """The matrices here are tiny: one intra-op thread is faster, and immune to the busy-waiting
    slowdowns OpenMP threads suffer on a loaded 2-core machine. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
