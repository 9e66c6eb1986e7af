"""SigmaScale: the truncation's gap-only backward, the learned scaling, its compositions, the report."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import build, calibration

import lowrank
from lowrank import LayerStats
from lowrank_builtin.sigmascale import SigmaScale, TruncEigh, TruncSVD, reconstruct, truncate

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def constructed(m: int, n: int, s: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = len(s)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))
    return (u * torch.tensor(s, dtype=F64)) @ v.T


FUNCTIONS = {
    "svd": lambda a, k: TruncSVD.apply(a, k, 1e-30),
    "eigh": lambda a, k: TruncEigh.apply(a, k, 1e-30, None),
}


@pytest.mark.parametrize("method", list(FUNCTIONS))
@pytest.mark.parametrize("shape,k", [((6, 4), 2), ((4, 6), 1), ((5, 5), 3), ((2, 7, 3), 2)])
def test_backward_matches_finite_differences(method, shape, k):
    g = torch.Generator().manual_seed(sum(shape) + k)
    a = torch.randn(*shape, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: FUNCTIONS[method](x, k), (a,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", list(FUNCTIONS))
def test_backward_matches_torch_svd_autograd_on_separated_spectra(method):
    a = constructed(7, 5, [5.0, 3.0, 2.0, 1.0, 0.5]).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    gf, gs = torch.randn(7, 5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    f, s = FUNCTIONS[method](a, 2)
    ours, = torch.autograd.grad((f * gf).sum() + (s * gs).sum(), a)
    f2, s2 = truncate(a, 2, "autograd")
    ref, = torch.autograd.grad((f2 * gf).sum() + (s2 * gs).sum(), a)
    assert torch.allclose(f, f2, atol=1e-12) and torch.allclose(s, s2, atol=1e-12)
    assert torch.allclose(ours, ref, atol=1e-10), float((ours - ref).abs().max())


@pytest.mark.parametrize("method", list(FUNCTIONS))
def test_degenerate_kept_and_dropped_sets_cancel(method):
    """Repeated values inside the kept and inside the dropped set: Trunc_k is still smooth and the
    gradient matches finite differences (torch's SVD backward divides by those zero gaps)."""
    a = constructed(6, 5, [3.0, 3.0, 1.0, 0.5, 0.5]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: FUNCTIONS[method](x, 2)[0], (a,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["svd", "eigh"])
def test_degenerate_boundary_stays_finite(method):
    a = constructed(6, 4, [3.0, 1.0, 1.0, 0.5]).requires_grad_(True)
    f, _ = truncate(a, 2, method, eps=1e-12)
    grad, = torch.autograd.grad((f * torch.ones_like(f)).sum(), a)
    assert torch.isfinite(grad).all()


def _stats(n: int, tokens: int, seed: int) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=F64) * torch.logspace(0, 1.5, n, dtype=F64)
    return LayerStats(x.T @ x, tokens, x.abs().mean(0), inputs=x.float())


def test_learning_lowers_the_loss_and_reports_it():
    w = constructed(12, 10, [float(v) for v in torch.logspace(0, -2, 10)], seed=3)
    stats = _stats(10, 64, 4)
    t = SigmaScale(steps=40, lr=0.05).fit(w, stats, rank=4)
    d = t.diagnostics
    assert d["loss_learned"] < 0.95 * d["loss_start"]
    assert isinstance(t.left, lowrank.Diagonal) and isinstance(t.right, lowrank.Diagonal)
    for key in ("effective_rank_before", "effective_rank_after", "participation_ratio_before", "participation_ratio_after"):
        assert d[key] > 0
    # the reported loss is the loss of the returned transform
    wp, _ = reconstruct(w, t.left.d.log(), t.right.d.log(), 4)
    dd = w - wp
    assert math.isclose(float(((dd @ stats.covariance) * dd).sum()) / w.numel(), d["loss_learned"], rel_tol=1e-9)


def test_lbfgs_and_the_activations_loss_agree_with_the_gram_loss():
    w = constructed(12, 10, [float(v) for v in torch.logspace(0, -2, 10)], seed=5)
    stats = _stats(10, 64, 6)
    gram = SigmaScale(steps=15, optimizer="lbfgs").fit(w, stats, rank=4)
    acts = SigmaScale(steps=15, optimizer="lbfgs", loss="activations").fit(w, stats, rank=4)
    ref = SigmaScale(steps=15, loss="activations", truncation="autograd", batched=False).fit(w, stats, rank=4)
    # the two loss forms are one definition: the same value at the identity
    assert math.isclose(gram.diagnostics["loss_start"], acts.diagnostics["loss_start"], rel_tol=1e-5)
    assert gram.diagnostics["loss_learned"] < gram.diagnostics["loss_start"]
    assert math.isclose(gram.diagnostics["loss_learned"], acts.diagnostics["loss_learned"], rel_tol=1e-2)
    assert ref.diagnostics["loss_learned"] <= ref.diagnostics["loss_start"]


@pytest.mark.parametrize("options", [
    {"sequential": True}, {"train": "rows"}, {"train": "cols"}, {"rank_term": "entropy"},
    {"rank_term": "participation", "rank_term_weight": 0.1}, {"truncation": "svd"}, {"precision": "float64"},
    {"patience": 3, "min_delta": 0.5}, {"optimizer": "lbfgs", "sequential": True},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options_never_end_above_the_identity(options):
    w = constructed(9, 7, [float(v) for v in torch.logspace(0, -2, 7)], seed=11)
    t = SigmaScale(steps=6, lr=0.05, **options).fit(w, _stats(7, 40, 12), rank=3)
    d = t.diagnostics
    assert d["loss_learned"] <= d["loss_start"] and d["steps"] >= 1
    if options.get("train") == "rows":
        assert t.right is None
    if options.get("train") == "cols":
        assert t.left is None
    if "patience" in options:
        assert d["steps"] <= 5


def test_requires_follows_the_config():
    assert SigmaScale().requires == {"gram"}
    assert SigmaScale(init="asvd").requires == {"gram", "abs_mean"}
    assert SigmaScale(loss="activations").requires == {"gram", "inputs"}
    assert SigmaScale(objective="block").requires == {"gram", "block"}


def test_no_rank_returns_the_initialization_without_learning():
    w = constructed(8, 6, [3, 2, 1, 0.5, 0.2, 0.1])
    t = SigmaScale(init="asvd").fit(w, _stats(6, 32, 1), rank=None)
    assert any("without learning" in n for n in t.notes)
    assert t.right is not None  # asvd's column scaling
    assert SigmaScale().fit(w, _stats(6, 32, 1), rank=6).left is None  # full rank: nothing to learn


def test_asvd_init_starts_at_asvd():
    from lowrank_builtin import ASVD

    w = constructed(10, 8, [float(v) for v in torch.logspace(0, -2, 8)], seed=2)
    stats = _stats(8, 64, 3)
    t = SigmaScale(init="asvd", steps=0, init_std=0.0).fit(w, stats, rank=3)
    asvd = ASVD().fit(w, stats)
    assert torch.allclose(t.right.d, asvd.right.d, rtol=1e-6)  # (float32 optimisation precision)


def test_whitened_coordinates_leave_nothing_to_learn_for_the_layer_loss():
    """After whitening the layer loss is the plain Frobenius error: Eckart-Young makes the identity
    optimal, so stacking the layer-loss SigmaScale on whitening cannot beat whitening."""
    from lowrank_builtin import Whitening

    w = constructed(10, 8, [float(v) for v in torch.logspace(0, -2, 8)], seed=7)
    stats = _stats(8, 64, 8)
    white = Whitening().fit(w, stats)
    ws, st = white.apply(w), stats.transformed(white)
    t = SigmaScale(steps=20, lr=0.05, init_std=0.0).fit(ws, st, rank=3)
    assert t.diagnostics["loss_learned"] >= t.diagnostics["loss_start"] * (1 - 1e-6)
    assert st.prior == [white]


def _check_report(report, expect_learning: bool):
    for m in report.matrices:
        d = {k.split(".", 1)[1]: v for k, v in m.diagnostics.items() if k.startswith("sigmascale.")}
        assert d, m.name
        assert d["loss_learned"] <= d["loss_start"]
        assert m.effective_rank_before is not None and m.effective_rank_after is not None
        assert m.participation_ratio > 0
    if expect_learning:
        assert any(m.diagnostics["sigmascale.loss_learned"] < m.diagnostics["sigmascale.loss_start"]
                   for m in report.matrices)


@pytest.mark.parametrize("scalings", [
    [{"sigmascale": {"steps": 4, "lr": 0.05}}],
    [{"sigmascale": {"steps": 3, "init": "asvd", "optimizer": "lbfgs"}}],
    ["whitening", {"sigmascale": {"steps": 3, "objective": "block", "block_windows": 1}}],
], ids=["layer", "asvd-init", "whitening+block"])
def test_pipeline_end_to_end(scalings):
    model = build("llama")
    report = lowrank.compress(model, lowrank.Recipe(scalings=scalings, ratio=0.4, targets=["re:layers\\.0\\."]),
                              calibration(4, 16), progress=False)
    assert torch.isfinite(model(calibration(1, 8, seed=1)).logits).all()
    _check_report(report, expect_learning=True)
    # the report's new fields survive a JSON round trip
    back = lowrank.CompressionReport.from_dict(report.to_dict())
    assert back.matrices[0].diagnostics == report.matrices[0].diagnostics


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_block_objective_joint_and_conv1d(arch):
    """GPT-2 stores Conv1D weights transposed: the block run must get the transposed candidate."""
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.grad for p in model.parameters()]
    report = lowrank.compress(model, lowrank.Recipe(
        scalings=[{"sigmascale": {"steps": 3, "objective": "block", "block_mode": "joint", "block_windows": 1}}],
        ratio=0.4, targets=["re:\\.0\\."]), calibration(4, 16), progress=False)
    _check_report(report, expect_learning=False)
    assert all(p.grad is None for p in model.parameters()) and all(g is None for g in grads_before)
    untouched = [k for k in before if ".0." not in k and k in model.state_dict()]
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in untouched)


def test_global_allocator_profiles_without_learning():
    model = build("llama")
    report = lowrank.compress(model, lowrank.Recipe(scalings=[{"sigmascale": {"steps": 2}}], allocator="energy",
                                                    ratio=0.3, targets=["re:layers\\.0\\."]),
                              calibration(4, 16), progress=False)
    assert report.ratio_achieved >= 0.3 - 1e-9
    assert all(m.diagnostics["sigmascale.steps"] > 0 for m in report.matrices if m.rank is not None)


def test_inspect_shows_the_report_diagnostics(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import lowrank.cli._common as common
    from lowrank import inspect_model
    from lowrank.cli import main

    model = build("llama")
    lowrank.compress(model, lowrank.Recipe(scalings=[{"sigmascale": {"steps": 2}}], ratio=0.4,
                                           targets=["re:layers\\.0\\."]), calibration(4, 16), progress=False)
    lowrank.save(model, tmp_path / "out")
    loaded = lowrank.load(tmp_path / "out")
    rows = {r.name: r for r in inspect_model(loaded)}
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q.effective_rank_before is not None and q.participation_ratio_after is not None
    assert rows["model.layers.1.self_attn.q_proj"].effective_rank_before is None  # not targeted
    monkeypatch.setattr(common, "open_model", lambda name, device="auto": (loaded, None, "cpu"))
    result = CliRunner().invoke(main, ["inspect", "whatever"])
    assert result.exit_code == 0, result.output
    assert "erank before" in result.output
    line = [x for x in result.output.splitlines() if "layers.0.self_attn.q_proj" in x][0]
    assert f"{q.effective_rank_before:.1f}" in line and f"{q.effective_rank_after:.1f}" in line
