"""Properties of the scalings, the scaled SVD and the factors built from it.

Notation: W is m x n, X is n x T (columns are tokens), N = n_tokens, G = X X^T, C = G / N (what
``LayerStats.covariance`` returns and what whitening factorizes). A scaling stack produces L W R;
the factors are A = L^-1 U_k S_k^1/2 and B = S_k^1/2 V_k^T R^-1, so W' = A B.

Tolerances are in units of the float64 round-off U, scaled by the size and the condition numbers
of the transforms (the factors apply L^-1 and R^-1, which amplify round-off by cond(L) cond(R)).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowrank
from lowrank import Selection, Transform, build_factors, scaled_svd
from lowrank_builtin import ASVD, Identity, Whitening

from .strategies import (
    DTYPE,
    EMPTY,
    FULL,
    RANK_DEFICIENT,
    ZERO,
    U,
    calibrations,
    chain_cond,
    chain_matrices,
    cond,
    dropped_energy,
    make_matrix,
    operators,
    problems,
    single_threaded_torch,  # noqa: F401  (autouse fixture)
)

# Round-off budget: |computed - exact| <= TOL * U * size * (condition numbers) * scale.
TOL = 100

STACKS = {
    "identity": ("identity",),
    "asvd": ("asvd",),
    "whitening": ("whitening",),
    "asvd+whitening": ("asvd", "whitening"),  # asvd needs abs_mean in its own coordinates: first
    "whitening+identity": ("whitening", "identity"),
    "identity+asvd": ("identity", "asvd"),
}
WHITENING_STACKS = [k for k, v in STACKS.items() if "whitening" in v]


def make_stack(names):
    registry = lowrank.get_registry()
    return [registry.get("scaling", name)() for name in names]


def factors(svd, k):
    return build_factors(svd, Selection.prefix(k))


def fro(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t)) if t.numel() else 0.0


def spec(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t, ord=2)) if t.numel() else 0.0


# --------------------------------------------------------------------------------------------
# Full-rank reconstruction


@pytest.mark.parametrize("stack", list(STACKS))
@given(problem=problems())
def test_full_rank_factors_reconstruct_w(stack, problem):
    w, calib = problem.mat.w, problem.calib
    m, n = w.shape
    svd = scaled_svd(w, calib.stats(), make_stack(STACKS[stack]))
    r = min(m, n)
    a, b = factors(svd, r)
    assert a.shape == (m, r) and b.shape == (r, n)
    assert a.dtype == b.dtype == DTYPE
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    bound = TOL * U * max(m, n) * chain_cond(svd.transforms, m, n) * fro(w)
    assert fro(a @ b - w) <= bound, (fro(a @ b - w), bound, svd.notes)


# --------------------------------------------------------------------------------------------
# Eckart-Young in the scaled norm


@pytest.mark.parametrize("stack", list(STACKS))
@given(problem=problems())
def test_eckart_young_in_scaled_norm(stack, problem):
    """||L W R - L A_k B_k R||_F^2 = sum_{i>k} sigma_i(L W R)^2, non-increasing in k.

    The reference spectrum is recomputed from the operators' explicit matrices, not taken from the
    library's SVD; for the identity stack it is also checked against the constructed spectrum.
    """
    w, calib = problem.mat.w, problem.calib
    m, n = w.shape
    svd = scaled_svd(w, calib.stats(), make_stack(STACKS[stack]))
    left, right = chain_matrices(svd.transforms, m, n)
    ws = left @ w @ right
    s_ref = torch.linalg.svdvals(ws)
    delta = TOL * U * max(m, n) * cond(left) * cond(right) * fro(ws)
    assert torch.allclose(svd.s, s_ref, rtol=0, atol=delta)
    if stack == "identity":
        assert torch.allclose(svd.s, problem.mat.s, rtol=0, atol=TOL * U * max(m, n))
    total = float(s_ref.pow(2).sum())
    previous = math.inf
    for k in range(min(m, n) + 1):
        a, b = factors(svd, k)
        err = fro(ws - left @ (a @ b) @ right)
        expected = math.sqrt(dropped_energy(s_ref, k))
        assert abs(err - expected) <= delta, (k, err, expected, delta)
        assert err <= previous + delta, (k, err, previous)
        previous = err
        if total > 0:
            rel = svd.spectrum_error(Selection.prefix(k))
            assert abs(rel - expected / math.sqrt(total)) <= delta / math.sqrt(total) + 1e-12


# --------------------------------------------------------------------------------------------
# Whitening and the activation norm


def activation_terms(w, a, b, calib, right):
    """||(W - AB) X||_F^2 and N tr(D E D^T), E = R R^T - C, with the round-off scale of the former."""
    d = w - a @ b
    x = calib.x
    n_tok = calib.n_tokens
    e = right @ right.T - calib.covariance
    err2 = fro(d @ x) ** 2
    jitter_term = n_tok * float(((d @ e) * d).sum())
    return err2, jitter_term, d, e


def activation_delta(w, right, calib, m, n):
    """Round-off scale of ||(W - W') X||_F for factors built through R (rows of W' are A B)."""
    n_tok = calib.n_tokens
    return TOL * U * max(m, n, 1) * (
        cond(right) * fro(w @ right) * math.sqrt(n_tok) + fro(w) * spec(calib.x)
    )


@pytest.mark.parametrize("stack", WHITENING_STACKS)
@given(problem=problems())
def test_whitening_activation_error_identity(stack, problem):
    """The exact identity behind whitening, for any X (rank-deficient and all-zero included).

    Whitening factorizes the *covariance* C = gram / n_tokens: it returns S with S S^T = C + E
    (E = 0 when the plain Cholesky succeeds, E = eps I with jitter, a floor on the eigenvalues in
    the eigh fallback, E = I for an all-zero input where S = I). With W' = A_k B_k and D = W - W':

        ||(W - W') X||_F^2 = n_tokens * (sum_{i>k} sigma_i(W S)^2 - tr(D E D^T))

    so without jitter ||(W - W')X||_F^2 = n_tokens * (dropped squared singular values of W S).
    (With R the whole stack's right operator, R R^T plays the role of S S^T.)
    """
    w, calib = problem.mat.w, problem.calib
    m, n = w.shape
    svd = scaled_svd(w, calib.stats(), make_stack(STACKS[stack]))
    left, right = chain_matrices(svd.transforms, m, n)
    assert torch.equal(left, torch.eye(m, dtype=DTYPE))
    s_ref = torch.linalg.svdvals(w @ right)
    n_tok = calib.n_tokens
    delta = activation_delta(w, right, calib, m, n)
    for k in range(min(m, n) + 1):
        a, b = factors(svd, k)
        err2, jitter_term, d, e = activation_terms(w, a, b, calib, right)
        lhs = err2 + jitter_term
        rhs = n_tok * dropped_energy(s_ref, k)
        # jitter_term is computed from E = R R^T - C, itself rounded at the scale U n ||R||^2.
        slack = TOL * U * n * n_tok * spec(right) ** 2 * fro(d) ** 2
        assert abs(math.sqrt(max(lhs, 0.0)) - math.sqrt(rhs)) <= delta + math.sqrt(slack), (
            k, lhs, rhs, delta, svd.notes)


@pytest.mark.parametrize("stack", WHITENING_STACKS)
@given(problem=problems(kinds=(FULL,), max_log10_kappa_x=3.0))
def test_whitening_stacks_reach_the_optimal_activation_error(stack, problem):
    """With a well-conditioned full-rank X (cond(C) <= 1e6, no jitter), every stack ending in
    whitening attains the optimum over all rank-k matrices:

        min_{rank W' <= k} ||(W - W') X||_F^2 = sum_{i>k} sigma_i(W X)^2

    (reference computed from W X directly, independently of any scaling).
    """
    w, calib = problem.mat.w, problem.calib
    m, n = w.shape
    svd = scaled_svd(w, calib.stats(), make_stack(STACKS[stack]))
    assert not any("jitter" in note or "fallback" in note for note in svd.notes), svd.notes
    _, right = chain_matrices(svd.transforms, m, n)
    s_ref = torch.linalg.svdvals(w @ calib.x)
    delta = activation_delta(w, right, calib, m, n)
    for k in range(min(m, n) + 1):
        a, b = factors(svd, k)
        err = fro((w - a @ b) @ calib.x)
        expected = math.sqrt(dropped_energy(s_ref, k))
        assert abs(err - expected) <= delta, (k, err, expected, delta)


def check_whitening_residual(s_mat, c, whitening, notes=()):
    """S S^T = C + E with E positive semi-definite (up to round-off) and no larger than the largest
    jitter whitening may add (jitter * 10^(max_tries-1) x the mean eigenvalue) or its eigenvalue
    floor; S = I exactly when C = 0 (no signal). Returns (lambda_min(E), lambda_max(E))."""
    n = c.shape[0]
    if not bool(c.any()):
        assert torch.equal(s_mat, torch.eye(n, dtype=DTYPE)), notes
        return 1.0, 1.0
    e = s_mat @ s_mat.T - c
    lam = torch.linalg.eigvalsh(0.5 * (e + e.T))
    rounding = TOL * U * n * spec(c)
    cfg = whitening.config
    largest_jitter = cfg.jitter * 10.0 ** (cfg.max_tries - 1) * float(c.diagonal().mean())
    assert float(lam[0]) >= -rounding, (lam, notes)
    assert float(lam[-1]) <= max(largest_jitter, cfg.eig_floor * spec(c)) * (1 + 1e-9) + rounding, (
        lam, notes)
    return float(lam[0]), float(lam[-1])


@given(problem=problems(), alpha=st.sampled_from([0.5, 1.0, 2.0]))
def test_whitening_never_worse_than_identity_or_asvd(problem, alpha):
    """At every rank, whitening's activation error is at most identity's and asvd's.

    With S S^T = C + E (E the jitter or eigenvalue floor, see above), whitening minimizes
    tr(D (C + E) D^T), so for any other rank-k W'' (D'' = W - W''):

        ||D_w X||^2 <= ||D'' X||^2 + N (lambda_max(E) ||D''||_F^2 - lambda_min(E) ||D_w||_F^2)

    Every method's error is also at least the unconstrained optimum sum_{i>k} sigma_i(W X)^2.
    """
    w, calib = problem.mat.w, problem.calib
    m, n = w.shape
    stats = calib.stats()
    n_tok = calib.n_tokens
    white = scaled_svd(w, stats, [Whitening()])
    others = {"identity": scaled_svd(w, stats, [Identity()]),
              "asvd": scaled_svd(w, stats, [ASVD(alpha=alpha)])}
    _, r_w = chain_matrices(white.transforms, m, n)
    lam_min, lam_max = check_whitening_residual(r_w, calib.covariance, Whitening(), white.notes)
    delta_w = activation_delta(w, r_w, calib, m, n)
    deltas = {}
    for name, svd in others.items():
        _, r_o = chain_matrices(svd.transforms, m, n)
        deltas[name] = activation_delta(w, r_o, calib, m, n)
    s_opt = torch.linalg.svdvals(w @ calib.x) if calib.x.numel() else torch.zeros(0, dtype=DTYPE)
    for k in range(min(m, n) + 1):
        a, b = factors(white, k)
        err_w2, _, d_w, _ = activation_terms(w, a, b, calib, r_w)
        optimum = math.sqrt(dropped_energy(s_opt, k))
        assert math.sqrt(err_w2) >= optimum - delta_w
        for name, svd in others.items():
            a_o, b_o = factors(svd, k)
            d_o = w - a_o @ b_o
            err_o2 = fro(d_o @ calib.x) ** 2
            assert math.sqrt(err_o2) >= optimum - deltas[name]
            allowance = n_tok * (max(lam_max, 0.0) * fro(d_o) ** 2 + max(-lam_min, 0.0) * fro(d_w) ** 2)
            bound = math.sqrt(err_o2 + allowance) + delta_w + deltas[name]
            assert math.sqrt(err_w2) <= bound, (name, k, math.sqrt(err_w2), bound, white.notes)


@given(problem=problems(kinds=RANK_DEFICIENT))
def test_whitening_survives_degenerate_inputs(problem):
    """Rank-deficient, all-zero and empty inputs: no exception, finite factors at every rank, an
    invertible S with S S^T = C + E, E positive semi-definite and at most the largest jitter tried
    (1e-6 * 10^5 = 0.1 x the mean eigenvalue); S = I when there is no signal at all."""
    w, calib = problem.mat.w, problem.calib
    m, n = w.shape
    whitening = Whitening()
    svd = scaled_svd(w, calib.stats(), [whitening])
    (t,) = svd.transforms
    s_mat = t.right.matrix()
    assert torch.isfinite(s_mat).all()
    assert cond(s_mat) < math.inf
    for k in range(min(m, n) + 1):
        a, b = factors(svd, k)
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), (k, svd.notes)
    check_whitening_residual(s_mat, calib.covariance, whitening, svd.notes)
    if calib.kind in (ZERO, EMPTY):
        plain = scaled_svd(w, calib.stats(), [Identity()])
        for k in range(min(m, n) + 1):
            a, b = factors(svd, k)
            a0, b0 = factors(plain, k)
            assert torch.allclose(a @ b, a0 @ b0, rtol=0, atol=TOL * U * max(m, n) * fro(w))


def test_whitening_eigh_fallback_on_indefinite_second_moment():
    """When Cholesky fails even with the largest jitter, the eigh fallback floors the eigenvalues."""
    from lowrank_builtin.scalings import cholesky_factor

    cov = torch.diag(torch.tensor([1.0, -0.5, 2.0], dtype=DTYPE))
    op, notes = cholesky_factor(cov)
    assert any("fallback" in note for note in notes)
    mat = op.matrix()
    assert torch.isfinite(mat).all()
    w = make_matrix(4, 3, 0, 10.0).w
    assert torch.allclose(op.inv_right(op.right(w)), w, rtol=0, atol=1e-12)
    expected = cov.clamp_min(1e-10 * 2.0).diagonal()
    assert torch.allclose(torch.linalg.eigvalsh(mat @ mat.T), expected.sort().values, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# Transforms, operators and transformed statistics


@pytest.mark.parametrize("scaling", ["identity", "asvd", "whitening"])
@given(problem=problems())
def test_transform_round_trip(scaling, problem):
    """undo(apply(W)) == W, and apply(W) == L W R with the operators' explicit matrices."""
    w, calib = problem.mat.w, problem.calib
    m, n = w.shape
    t = make_stack([scaling])[0].fit(w, calib.stats())
    left, right = chain_matrices([t], m, n)
    applied = t.apply(w)
    c = cond(left) * cond(right)
    assert torch.allclose(applied, left @ w @ right, rtol=0,
                          atol=TOL * U * max(m, n) * spec(left) * spec(right) * fro(w))
    assert torch.allclose(t.undo(applied), w, rtol=0, atol=TOL * U * max(m, n) * c * fro(w))


@given(data=st.data(), n=st.integers(1, 30))
def test_operators_agree_with_their_matrices(data, n):
    op = data.draw(operators(n))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    k = data.draw(st.integers(1, 6))
    mat = op.matrix()
    inv = torch.linalg.inv(mat)
    assert op.size == n
    assert op.is_diagonal == (type(op).__name__ == "Diagonal")
    x = torch.randn(n, k, generator=g, dtype=DTYPE)
    y = torch.randn(k, n, generator=g, dtype=DTYPE)
    c = cond(mat)
    tol_fwd = TOL * U * n * spec(mat)
    tol_inv = TOL * U * n * c * spec(inv)
    assert torch.allclose(op.left(x), mat @ x, rtol=0, atol=tol_fwd * fro(x))
    assert torch.allclose(op.right(y), y @ mat, rtol=0, atol=tol_fwd * fro(y))
    assert torch.allclose(op.inv_left(x), inv @ x, rtol=0, atol=tol_inv * fro(x))
    assert torch.allclose(op.inv_right(y), y @ inv, rtol=0, atol=tol_inv * fro(y))
    assert torch.allclose(op.inv_left(op.left(x)), x, rtol=0, atol=TOL * U * n * c * fro(x))
    assert torch.allclose(op.inv_right(op.right(y)), y, rtol=0, atol=TOL * U * n * c * fro(y))


@given(data=st.data(), n=st.integers(1, 30))
def test_layer_stats_transformed_is_the_statistics_of_the_transformed_inputs(data, n):
    """x' = R^-1 x, so gram' = R^-1 G R^-T = (R^-1 X)(R^-1 X)^T and abs_mean' = mean |R^-1 x|
    (kept only for a diagonal R); n_tokens and the row statistics carry over, the raw inputs become
    R^-1 x; a left-only transform changes nothing."""
    op = data.draw(operators(n))
    calib = data.draw(calibrations(n, kinds=(FULL,) + RANK_DEFICIENT if n > 1 else (FULL, ZERO)))
    stats = calib.stats()
    stats.grad_row_sq = torch.ones(1, dtype=DTYPE)
    stats.inputs = calib.x.T.clone()
    out = stats.transformed(Transform(right=op))
    inv = torch.linalg.inv(op.matrix())
    xp = inv @ calib.x
    expected = xp @ xp.T
    scale = TOL * U * n * cond(op.matrix()) * spec(inv) ** 2 * max(fro(stats.gram), 1e-300)
    assert out.n_tokens == stats.n_tokens
    assert out.grad_row_sq is stats.grad_row_sq
    assert torch.allclose(out.inputs, xp.T, rtol=0, atol=scale ** 0.5 + TOL * U * fro(xp) * cond(op.matrix()))
    assert torch.allclose(out.gram, out.gram.T, rtol=0, atol=scale)
    assert torch.allclose(out.gram, inv @ stats.gram @ inv.T, rtol=0, atol=scale), (
        fro(out.gram - inv @ stats.gram @ inv.T), scale)
    assert torch.allclose(out.gram, expected, rtol=0, atol=scale)
    if op.is_diagonal:
        am = xp.abs().sum(1) / max(calib.n_tokens, 1)
        assert torch.allclose(out.abs_mean, am, rtol=1e-12, atol=0)
    else:
        assert out.abs_mean is None
    same = stats.transformed(Transform(left=op))
    assert torch.equal(same.gram, stats.gram) and torch.equal(same.abs_mean, stats.abs_mean)


@given(problem=problems(), ridge=st.sampled_from([1e-4, 1e-2, 1.0]))
def test_whitening_ridge_factors_the_ridged_covariance(problem, ridge):
    """``ridge`` (ZS-SVD's profiling) whitens C + ridge I: S S^T equals it up to round-off, and the
    optimum it reaches is the activation-norm optimum of the ridged inputs."""
    w, calib = problem.mat.w, problem.calib
    m, n = w.shape
    stats = calib.stats()
    c = stats.covariance + ridge * torch.eye(n, dtype=DTYPE)
    svd = scaled_svd(w, stats, [Whitening(ridge=ridge)])
    assert not any("jitter" in note or "fallback" in note for note in svd.notes), svd.notes
    _, right = chain_matrices(svd.transforms, m, n)
    assert torch.allclose(right @ right.T, c, rtol=1e-8, atol=TOL * U * n * spec(c))
    assert torch.allclose(svd.s, torch.linalg.svdvals(w @ right), rtol=1e-8, atol=TOL * U * n * spec(c) * fro(w))
