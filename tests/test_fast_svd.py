"""The fast factorizations agree with LAPACK's float64 SVD where they are used, and fall back where
they should (ill-conditioned in the components that matter; for the randomized route also a
spectrum without a gap, an unconverged range, a missed component)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from properties.strategies import SEEDS, STYLES, generator, make_matrix, orthonormal, spectrum

import lowrank
from lowrank import LayerStats, Selection, build_factors
from lowrank._engine import svd as svd_module
from lowrank._engine.factorize import scaled_svd_batch
from lowrank._engine.svd import GRAM_MIN_RATIO, RANDOMIZED_TOL, needed_components, thin_svd

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


# -- the randomized route ------------------------------------------------------------------------
# It runs only when asked (method "randomized"), for k <= min(m, n) / 4 leading components of a
# matrix with min(m, n) >= 2048 (64 here), and only when its check passes; everything else is the
# Gram route.

RTOL_RANDOMIZED = 2 * RANDOMIZED_TOL   # the stated tolerance, plus LAPACK's own round-off
DEFAULT_MIN_SIDE = svd_module._MIN_SIDE


@pytest.fixture(scope="module", autouse=True)
def randomized_on_small_matrices():
    """The route's size threshold (min(m, n) >= 2048, where it pays on the CPU) would make every
    matrix here huge; its arithmetic and its check do not depend on the size, so the tests lower it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(svd_module, "_MIN_SIDE", 64)
        yield


def _low_rank_plus_noise(m: int, n: int, rank: int, kappa: float, noise: float, seed: int) -> torch.Tensor:
    """A rank-``rank`` matrix with singular values in [1/kappa, 1], plus Gaussian noise whose
    singular values are about ``noise`` at most: a gap of kappa * noise at the rank."""
    g = generator(seed)
    signal = (orthonormal(m, rank, g) * spectrum(rank, kappa, "random", g)) @ orthonormal(n, rank, g).T
    return signal + noise * torch.randn(m, n, generator=g, dtype=D) / (2 * max(m, n) ** 0.5)


def _agrees_with_lapack(out, w: torch.Tensor, k: int) -> None:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    scale = float(s[0])
    assert out.s.shape == s.shape   # the whole spectrum, whichever route ran
    assert torch.allclose(out.s[:k], s[:k], rtol=RTOL_RANDOMIZED, atol=1e-12 * scale)
    # the tail comes from the Gram matrix's eigenvalues, as on the Gram route: exact to about
    # sqrt(eps64 min(m, n)) sigma_1 where the matrix is rank-deficient (sqrt of round-off eigenvalues)
    assert torch.allclose(out.s, s, rtol=0, atol=1e-7 * scale)
    gap = float(s[k - 1] - s[k])
    if gap > 1e-6 * scale:   # the kept subspace: the rank-k truncation is the same matrix
        err = (_truncation(out.u, out.s, out.vh, k) - _truncation(u, s, vh, k)).norm()
        assert float(err) <= 1e-5 * scale * scale / gap
    q, p = out.u[:, :k], out.vh[:k]
    assert torch.allclose(q.T @ q, torch.eye(k, dtype=D), atol=1e-10)
    assert torch.allclose(p @ p.T, torch.eye(k, dtype=D), atol=1e-10)


@given(m=st.integers(64, 112), n=st.integers(64, 112), seed=SEEDS, data=st.data())
def test_randomized_route_equals_lapack_on_low_rank_plus_noise(m, n, seed, data):
    rank = data.draw(st.integers(1, min(m, n) // 4))
    kappa = 10.0 ** data.draw(st.floats(0.0, 1.0))
    noise = data.draw(st.sampled_from([1e-4, 1e-6, 0.0]))
    w = _low_rank_plus_noise(m, n, rank, kappa, noise, seed) * data.draw(st.sampled_from([1e-6, 1.0, 1e6]))
    out = thin_svd(w, rank, "randomized")
    # the gap makes the route predictably cheap (except near k = min(m, n) / 4 of the smallest
    # matrices, where the flop model prefers the Gram route), and its check never rejects it here
    sigma = torch.linalg.eigvalsh(svd_module._gram(w)).flip(0).clamp_min(0).sqrt()   # what the route plans on
    planned = svd_module._randomized_plan(sigma, rank, (m, n)) is not None
    assert out.method == ("randomized" if planned else "gram-eigh") and out.notes == []
    if planned:
        assert out.u.shape == (m, rank) and out.vh.shape == (rank, n)   # vectors for the kept components only
    _agrees_with_lapack(out, w, rank)


@given(m=st.integers(64, 112), n=st.integers(64, 112), seed=SEEDS, data=st.data())
def test_randomized_method_equals_lapack_on_random_spectra(m, n, seed, data):
    # whichever route the method ends up taking (most of these spectra have no gap: the Gram route)
    mat = make_matrix(m, n, seed, 10.0 ** data.draw(st.floats(0.0, 6.0)), data.draw(st.sampled_from(STYLES)))
    k = data.draw(st.integers(1, min(m, n) // 4))
    out = thin_svd(mat.w, k, "randomized")
    assert out.method in ("randomized", "gram-eigh", "svd")
    _agrees_with_lapack(out, mat.w, k)
    if out.method != "randomized":   # then it is exactly what auto gives
        auto = thin_svd(mat.w, k)
        assert out.method == auto.method and torch.equal(out.s, auto.s) and torch.equal(out.u, auto.u)


def test_randomized_route_only_when_asked_and_few_components(monkeypatch):
    w = _low_rank_plus_noise(120, 200, 10, 3.0, 1e-4, seed=3)
    assert thin_svd(w, 10, "randomized").method == "randomized"
    assert thin_svd(w, 10).method == "gram-eigh"                  # auto never takes it
    assert thin_svd(w, 10, "svd").method == "svd"                 # svd is LAPACK, always
    assert thin_svd(w, 31, "randomized").method == "gram-eigh"    # more than min(m, n) / 4
    small = _low_rank_plus_noise(40, 60, 4, 3.0, 1e-4, seed=3)
    assert thin_svd(small, 4, "randomized").method == "gram-eigh"  # too small to be worth it
    monkeypatch.setattr(svd_module, "_MIN_SIDE", DEFAULT_MIN_SIDE)
    assert DEFAULT_MIN_SIDE == 2048 and thin_svd(w, 10, "randomized").method == "gram-eigh"


def test_randomized_route_falls_back_on_a_flat_spectrum():
    # a Gaussian matrix: sigma_{2k} / sigma_k is close to 1, no affordable plan reaches the tolerance
    w = torch.randn(96, 160, generator=generator(4), dtype=D)
    out = thin_svd(w, 20, "randomized")
    assert out.method == "gram-eigh" and out.notes == []
    assert torch.equal(out.u, thin_svd(w, 20).u)


def test_randomized_check_rejects_an_unconverged_range(monkeypatch):
    # force a plan with no subspace iteration on a flat spectrum: the residual check must see it
    monkeypatch.setattr(svd_module, "_iterations", lambda ratio: 0)
    w = torch.randn(96, 160, generator=generator(5), dtype=D)
    out = thin_svd(w, 20, "randomized")
    assert out.method == "gram-eigh"
    assert len(out.notes) == 1 and out.notes[0].startswith("randomized: rejected by its check")
    auto = thin_svd(w, 20)
    assert torch.equal(out.u, auto.u) and torch.equal(out.s, auto.s)   # the same Gram route


def test_randomized_check_detects_a_missed_component():
    # v_1 orthogonal to the route's own test matrix: the range finder never sees sigma_1 and
    # returns exact triplets for sigma_2.. sigma_{k+1} (residuals at round-off); only the
    # comparison with the Gram spectrum can tell
    m, n, k = 150, 200, 8
    s = torch.cat([1.0 - 0.01 * torch.arange(k + 1, dtype=D), torch.full((m - k - 1,), 1e-4, dtype=D)])
    plan = svd_module._randomized_plan(s, k, (m, n))
    assert plan is not None
    omega = torch.randn(n, plan.block, generator=torch.Generator().manual_seed(svd_module.RANDOMIZED_SEED), dtype=D)
    g = generator(6)
    v1 = torch.randn(n, 1, generator=g, dtype=D)
    v1 -= omega @ torch.linalg.lstsq(omega, v1).solution
    v = torch.linalg.qr(torch.cat([v1 / v1.norm(), torch.randn(n, m - 1, generator=g, dtype=D)], 1)).Q
    u = orthonormal(m, m, g)
    w = (u * s) @ v.T
    out = thin_svd(w, k, "randomized")
    assert out.method == "gram-eigh" and "rejected" in out.notes[0]
    assert torch.allclose(out.s[:k], s[:k], rtol=1e-10)
    # the control: the same spectrum on vectors the draw sees is accepted
    control = (u * s) @ orthonormal(n, m, g).T
    assert thin_svd(control, k, "randomized").method == "randomized"


def test_randomized_route_falls_back_on_ill_conditioned_components():
    w = _matrix(256, 128, decay=0.5, seed=7)            # sigma_i = 0.5^i
    assert thin_svd(w, 10, "randomized").method == "randomized"   # sigma_10 / sigma_1 = 2e-3
    assert thin_svd(w, 20, "randomized").method == "svd"          # 0.5^19 = 2e-6 < GRAM_MIN_RATIO
    _agrees_with_lapack(thin_svd(w, 10, "randomized"), w, 10)


def test_randomized_route_is_deterministic():
    w = _low_rank_plus_noise(100, 180, 12, 5.0, 1e-4, seed=8)
    torch.manual_seed(1)
    first = thin_svd(w, 12, "randomized")
    state = torch.get_rng_state()
    torch.manual_seed(2)
    second = thin_svd(w, 12, "randomized")
    assert first.method == second.method == "randomized"
    assert torch.equal(first.u, second.u) and torch.equal(first.s, second.s) and torch.equal(first.vh, second.vh)
    torch.manual_seed(1)
    thin_svd(w, 12, "randomized")
    assert torch.equal(torch.get_rng_state(), state)    # the global generator is not touched


def test_randomized_scaled_svd_keeps_the_whole_spectrum():
    from lowrank_builtin import Identity

    w = _low_rank_plus_noise(90, 150, 9, 4.0, 1e-3, seed=9)
    stats = LayerStats(torch.eye(150, dtype=D), 150)
    (svd,) = scaled_svd_batch([w], [stats], [Identity()], [9], "randomized", [9])
    assert svd.method == "randomized" and svd.stored_components == 9 and svd.s.numel() == 90
    s = torch.linalg.svdvals(w)
    for k in (3, 9):   # the dropped energy counts the components whose vectors were not computed
        exact = float((s[k:].pow(2).sum() / s.pow(2).sum()).sqrt())
        assert abs(svd.spectrum_error(Selection.prefix(k)) - exact) <= 1e-9 * exact
    a, b = build_factors(svd, Selection.prefix(9))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(a @ b, _truncation(u, s, vh, 9), atol=1e-8)
    with pytest.raises(ValueError, match="leading 9 components"):
        build_factors(svd, Selection((0, 9)))


def test_recipe_accepts_the_randomized_factorization():
    recipe = lowrank.Recipe(factorization="randomized")
    assert lowrank.Recipe.from_dict(recipe.to_dict()).factorization == "randomized"
    with pytest.raises(lowrank.RecipeError, match="randomized"):
        lowrank.Recipe(factorization="rsvd")
    with pytest.raises(ValueError, match="randomized"):
        thin_svd(torch.eye(3, dtype=D), 1, "rsvd")


def test_compression_with_the_randomized_factorization_reports_what_auto_does():
    # a tiny Llama whose targeted weights have a gap at the rank kept at 0.8 (whitening keeps the
    # rank: W L is as low-rank as W); k/v (32 x 64) are below the (lowered) size threshold
    from tiny_models import build, calibration
    from torch import nn

    def gapped(model):
        g = generator(10)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                m, n = module.weight.shape
                k = lowrank.uniform_rank((m, n), 0.8)
                signal = torch.randn(m, k, generator=g, dtype=D) @ torch.randn(k, n, generator=g, dtype=D) / n ** 0.5
                module.weight.data = (signal + 1e-6 * torch.randn(m, n, generator=g, dtype=D)).float()
        return model

    reports = {method: lowrank.compress(gapped(build("llama")), lowrank.Recipe(ratio=0.8, factorization=method, device="cpu"),
                                        calibration(4, 16), progress=False)
               for method in ("auto", "randomized")}
    auto, randomized = reports["auto"].matrices, reports["randomized"].matrices
    routes = {m.name: m.factorization for m in randomized}
    assert {routes[n] for n in routes if n.endswith(("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))} \
        == {"randomized"}
    assert {m.factorization for m in auto} == {"gram-eigh"}
    assert any(n.startswith("factorization: ") and "randomized" in n for n in reports["randomized"].notes)
    for a, r in zip(auto, randomized):   # the same ranks, errors and spectral diagnostics
        assert (a.name, a.rank, a.params_after) == (r.name, r.rank, r.params_after)
        assert r.scaled_error == pytest.approx(a.scaled_error, rel=1e-5, abs=1e-9)
        assert r.activation_error == pytest.approx(a.activation_error, rel=1e-5, abs=1e-9)
        assert r.effective_rank == pytest.approx(a.effective_rank, rel=1e-6)
        assert r.participation_ratio == pytest.approx(a.participation_ratio, rel=1e-6)


def test_activation_error_is_float64_by_default_and_close_in_float32():
    """The public function keeps float64 (methods are compared with it at 1e-9); the report's
    float32 products agree to about 1e-6."""
    from lowrank import activation_error

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g, dtype=torch.float64)
    x = torch.randn(32, 200, generator=g, dtype=torch.float64)
    gram = x @ x.T / 200
    approx = w + 1e-3 * torch.randn(48, 32, generator=g, dtype=torch.float64)
    d = w - approx
    exact = float(torch.sqrt(torch.trace(d @ gram @ d.T) / torch.trace(w @ gram @ w.T)))
    assert activation_error(w, approx, gram) == pytest.approx(exact, rel=1e-12)
    assert activation_error(w, approx, gram, dtype=torch.float32) == pytest.approx(exact, rel=1e-5)
