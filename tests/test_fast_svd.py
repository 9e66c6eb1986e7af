"""The fast factorization agrees with LAPACK's float64 SVD where it is used, and falls back where
it should (ill-conditioned in the components that matter)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank._engine.svd import GRAM_MIN_RATIO, needed_components, thin_svd

pytestmark = pytest.mark.usefixtures("single_thread")
D = torch.float64


def _matrix(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    """U diag(decay^i) V^T with random orthonormal U, V: a spectrum spanning decay^(r-1)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=D))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=D))
    s = decay ** torch.arange(r, dtype=D)
    return (u * s) @ v.T


def _truncation(u, s, vh, k):
    return (u[:, :k] * s[:k]) @ vh[:k]


@given(m=st.integers(1, 48), n=st.integers(1, 48), seed=st.integers(0, 2**16), data=st.data())
def test_fast_route_equals_lapack_on_random_matrices(m, n, seed, data):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=D) * data.draw(
        st.sampled_from([1e-6, 1.0, 1e6]))
    k = data.draw(st.integers(1, min(m, n)))
    fast = thin_svd(w, k)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    scale = float(s[0])
    assert fast.method in ("gram-eigh", "svd")
    assert torch.allclose(fast.s, s, rtol=0, atol=1e-9 * scale)
    if fast.method == "gram-eigh":
        # the kept subspace: the rank-k truncation is the same matrix (when the gap allows it)
        gap = float(s[k - 1] - s[k]) if k < min(m, n) else scale
        if gap > 1e-6 * scale:
            err = (_truncation(fast.u, fast.s, fast.vh, k) - _truncation(u, s, vh, k)).norm()
            assert float(err) <= 1e-7 * scale * scale / gap
        # the kept singular vectors are orthonormal
        q = fast.u[:, :k]
        assert torch.allclose(q.T @ q, torch.eye(k, dtype=D), atol=1e-8)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
def test_ill_conditioned_matrices_fall_back_to_lapack(shape):
    # sigma_i = 0.5^i: at the break-even rank (>= 28 here) the ratio is below 0.5^27 ~ 7e-9
    w = _matrix(*shape, decay=0.5, seed=1)
    r = min(shape)
    assert thin_svd(w, r).method == "svd"
    assert thin_svd(w, needed_components(shape, None)).method == "svd"  # break-even is deep in the tail
    assert thin_svd(w).method == "svd"                     # every component asked for
    assert thin_svd(w, 3).method == "gram-eigh"           # only the leading components matter
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    exact = thin_svd(w, r)
    assert torch.allclose(exact.s, s, rtol=1e-10, atol=0)


def test_threshold_is_on_the_components_that_matter():
    w = _matrix(50, 30, decay=GRAM_MIN_RATIO ** (1 / 10), seed=2)   # sigma_10 / sigma_0 = 1e-5
    assert thin_svd(w, 10).method == "gram-eigh"
    assert thin_svd(w, 12).method == "svd"


def test_zero_and_rank_deficient_matrices():
    zero = torch.zeros(7, 5, dtype=D)
    out = thin_svd(zero, 2)
    assert out.method == "gram-eigh" and float(out.s.abs().max()) == 0.0 and torch.isfinite(out.u).all()
    low = torch.randn(30, 3, dtype=D) @ torch.randn(3, 20, dtype=D)
    out = thin_svd(low, 3)
    assert torch.allclose(_truncation(out.u, out.s, out.vh, 3), low, atol=1e-9 * float(low.norm()))
