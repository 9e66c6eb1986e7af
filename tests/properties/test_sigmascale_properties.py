"""Properties of the learned SigmaScale scaling on seeded constructed problems.

- the exponential parameterization inverts exactly (D^-1 (D W) = W to round-off, and the factors of
  a learned scaling reconstruct W at full rank);
- at full rank the truncation is the identity map, so W' = W whatever the scalings;
- the learned loss never ends above the identity start, checked with the pipeline's own float64 SVD;
- the batched and the unbatched paths agree.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank import Diagonal, Selection, build_factors, scaled_svd
from lowrank_builtin.sigmascale import SigmaScale, TruncEigh, TruncSVD, reconstruct

from .strategies import (
    DTYPE,
    FULL,
    SEEDS,
    U,
    chain_cond,
    generator,
    make_calibration,
    make_matrix,
    matrices,
    problems,
    single_threaded_torch,  # noqa: F401  (autouse fixture)
)

FAST = dict(steps=8, lr=0.05, noise=0.0)


def fro(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t)) if t.numel() else 0.0


def layer_loss(w: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    d = w - approx
    return float(((d @ cov) * d).sum()) / w.numel()


def truncation_loss(w, stats, scalings, k: int) -> float:
    """The loss the pipeline gets: its float64 SVD of the scaled weight, truncated to k."""
    svd = scaled_svd(w, stats, scalings, rank=k)
    a, b = build_factors(svd, Selection.prefix(k))
    return layer_loss(w, a @ b, stats.covariance)


@given(mat=matrices(max_dim=24), seed=SEEDS, scale=st.floats(0.0, 3.0))
def test_exponential_parameterization_inverts_exactly(mat, seed, scale):
    g = generator(seed)
    d_r = torch.randn(mat.m, generator=g, dtype=DTYPE) * scale
    d_c = torch.randn(mat.n, generator=g, dtype=DTYPE) * scale
    left, right = Diagonal(d_r.exp()), Diagonal(d_c.exp())
    back = right.inv_right(left.inv_left(right.right(left.left(mat.w))))
    # each entry is multiplied and divided by the same two numbers: a few ulps
    assert torch.allclose(back, mat.w, rtol=8 * U, atol=0)
    assert torch.allclose(d_r.exp() * (-d_r).exp(), torch.ones_like(d_r), rtol=4 * U, atol=0)


@given(mat=matrices(max_dim=24), seed=SEEDS, scale=st.floats(0.0, 2.0))
def test_full_rank_truncation_reconstructs_w(mat, seed, scale):
    g = generator(seed)
    d_r = torch.randn(mat.m, generator=g, dtype=DTYPE) * scale
    d_c = torch.randn(mat.n, generator=g, dtype=DTYPE) * scale
    r = min(mat.m, mat.n)
    wp, _ = reconstruct(mat.w, d_r, d_c, r)
    assert torch.allclose(wp, mat.w, rtol=8 * U, atol=0)
    # the truncation functions themselves are the identity map at full rank (to round-off)
    a = d_r.exp()[:, None] * mat.w * d_c.exp()[None, :]
    for fn in (lambda x: TruncEigh.apply(x, r, 1e-12, None), lambda x: TruncSVD.apply(x, r, 1e-12)):
        f, s = fn(a)
        # eigh squares the condition number of A (its small directions carry absolute error)
        assert fro(f - a) <= 100 * U * max(mat.m, mat.n) * fro(a) * (1 + float(s[0] / s[-1]) if s[-1] > 0 else 1e300)


@given(problem=problems(kinds=(FULL, "few_tokens", "dead_channels", "zero"), max_dim=12),
       frac=st.floats(0.2, 0.8))
@settings(max_examples=15)
def test_learned_loss_never_above_the_identity_start(problem, frac):
    w, stats = problem.mat.w, problem.calib.stats()
    m, n = w.shape
    k = max(1, min(min(m, n) - 1, round(frac * min(m, n))))
    scaling = SigmaScale(**FAST)
    t = scaling.fit(w, stats, rank=k)
    if min(m, n) <= 1:
        return
    d = t.diagnostics
    assert d["loss_learned"] <= d["loss_start"]
    learned = truncation_loss(w, stats, [_Fixed(t)], k)
    start = truncation_loss(w, stats, [_Fixed(None)], k)
    assert learned <= start * (1 + 1e-7) + 1e-300, (learned, start, t.notes)
    # the learned scaling is exactly invertible: its factors at full rank give W back
    svd = scaled_svd(w, stats, [_Fixed(t)])
    a, b = build_factors(svd, Selection.prefix(min(m, n)))
    bound = 200 * U * max(m, n) * chain_cond(svd.transforms, m, n) * fro(w)
    assert fro(a @ b - w) <= bound


@given(seed=SEEDS, m=st.integers(3, 10), n=st.integers(3, 10), frac=st.floats(0.2, 0.8),
       noise=st.sampled_from([0.0, 1e-6]), train=st.sampled_from(["both", "rows", "cols"]))
@settings(max_examples=10)
def test_batched_and_unbatched_agree(seed, m, n, frac, noise, train):
    k = max(1, min(min(m, n) - 1, round(frac * min(m, n))))
    mats = [make_matrix(m, n, seed + i, 30.0, "random").w for i in range(3)]
    stats = [make_calibration(n, FULL, seed + 10 + i, 10.0, 3 * n).stats() for i in range(3)]
    cfg = dict(steps=6, lr=0.05, noise=noise, train=train, patience=3, min_delta=0.05)
    batched = SigmaScale(**cfg, batched=True).fit_batch([(w, s, k) for w, s in zip(mats, stats)])
    single = [SigmaScale(**cfg, batched=False).fit(w, s, rank=k) for w, s in zip(mats, stats)]
    for tb, ts in zip(batched, single):
        for side in ("left", "right"):
            ob, os_ = getattr(tb, side), getattr(ts, side)
            assert (ob is None) == (os_ is None)
            if ob is not None:
                assert torch.allclose(ob.d, os_.d, rtol=1e-4, atol=1e-5)
        assert math.isclose(tb.diagnostics["loss_learned"], ts.diagnostics["loss_learned"], rel_tol=1e-4)


class _Fixed(SigmaScale):
    """A scaling that returns a given transform (to replay a learned one through the pipeline)."""

    name = "fixed-test"

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def fit(self, weight, stats, rank=None):
        from lowrank import Transform

        return self.transform if self.transform is not None else Transform()

    def fit_batch(self, items):
        return [self.fit(*item) for item in items]
