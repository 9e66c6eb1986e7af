"""The zero-sum allocator (ZS-SVD): scores, the correction and the pipeline around them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build, calibration

import lowrank
from lowrank import (
    LayerStats,
    MatrixSpectrum,
    Selection,
    breakeven_rank,
    build_factors,
    find_targets,
    scaled_gradient,
    scaled_svd,
    stored_params,
    weight_of,
)
from lowrank._engine.contexts import EngineRefineContext as RefineContext
from lowrank_builtin import Identity, Whitening
from lowrank_builtin.fwsvd import FWSVD
from lowrank_builtin.zero_sum import ZeroSum, predicted_changes, project_onto_gradients

D = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def problem(m=12, n=9, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=D)
    x = torch.randn(n, t, generator=g, dtype=D) * torch.linspace(0.2, 3.0, n, dtype=D)[:, None]
    stats = LayerStats(x @ x.T, t, grad_row_sq=torch.rand(m, generator=g, dtype=D) + 0.1)
    grad = torch.randn(m, n, generator=g, dtype=D)
    return w, stats, grad


@pytest.mark.parametrize("scalings", [[Whitening()], [FWSVD(), Whitening()]], ids=["whitening", "fwsvd+whitening"])
@pytest.mark.parametrize("order", [1, 2])
def test_scorer_is_minus_sigma_u_h_v(scalings, order):
    """score_i = -sigma_i u_i^T H v_i (+ 1/2 sigma^2 (u^T H v)^2), H the gradient in scaled coordinates."""
    w, stats, grad = problem()
    svd = scaled_svd(w, stats, scalings)
    h = scaled_gradient(svd, grad)
    g = torch.einsum("mi,mn,in->i", svd.u, h, svd.vh)
    expected = -svd.s * g + (0.5 * svd.s.pow(2) * g.pow(2) if order == 2 else 0.0)
    spectrum = MatrixSpectrum("w", tuple(w.shape), svd.s)
    got = ZeroSum(order=order).component_scorer(spectrum, svd)(grad.float())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_first_order_score_is_exact_for_a_linear_loss():
    """For loss(W) = <C, W>, deleting component i changes the loss by exactly -sigma_i u_i^T H v_i."""
    w, stats, c = problem(seed=3)
    svd = scaled_svd(w, stats, [FWSVD(), Whitening()])
    r = svd.s.numel()
    full = build_factors(svd, Selection.prefix(r))
    w_full = full[0] @ full[1]
    scores = predicted_changes(svd.s, torch.einsum("mi,mn,in->i", svd.u, scaled_gradient(svd, c), svd.vh))
    for i in (0, r // 2, r - 1):
        a, b = build_factors(svd, Selection(tuple(j for j in range(r) if j != i)))
        actual = float((c * (a @ b - w_full)).sum())
        assert actual == pytest.approx(float(scores[i]), rel=1e-8, abs=1e-10)


def test_projection_onto_gradients():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 5, generator=g, dtype=D)
    g1, g2 = torch.randn(6, 5, generator=g, dtype=D), torch.randn(6, 5, generator=g, dtype=D)
    one = project_onto_gradients(delta, [g1], eps=0.0)
    torch.testing.assert_close(one, (g1 * delta).sum() / (g1 * g1).sum() * g1)
    two = project_onto_gradients(delta, [g1, g2], eps=0.0)
    residual = delta - two   # orthogonal to the span
    assert abs(float((residual * g1).sum())) < 1e-10 and abs(float((residual * g2).sum())) < 1e-10


# -- the correction on a tiny model ---------------------------------------------------------------


def _trained_tiny(seed=0):
    """A tiny Llama given a few steps of training, so its loss landscape is not flat."""
    model = build("llama", seed=seed)
    data = calibration(8, 32, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(25):
        logits = model(data).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    return model, data


def _context(model, data, rank_fraction=0.5):
    targets = find_targets(model, None, [])
    teacher, profiles, plan = {}, {}, {}
    for t in targets:
        w = weight_of(model.get_submodule(t.name)).detach().double()
        teacher[t.name] = w.clone()
        profiles[t.name] = scaled_svd(w, LayerStats(torch.zeros(w.shape[1], w.shape[1], dtype=D), 0), [Identity()])
        plan[t.name] = Selection.prefix(max(1, int(rank_fraction * min(w.shape))))
    ctx = RefineContext(model, targets, data, data[:1], torch.device("cpu"), profiles=profiles, teacher=teacher,
                        stage=0, stages=2)
    return ctx, plan


@pytest.mark.parametrize("lean,batches", [(True, 1), (False, 1), (True, 4)])
def test_correction_reduces_the_loss_on_its_batches(lean, batches):
    from lowrank_builtin.zero_sum import _correction_windows

    model, data = _trained_tiny()
    ctx, plan = _context(model, data)
    for name, sel in plan.items():
        ctx.set_weight(name, ctx.truncation(name, sel))
    batch = _correction_windows(data, batches, 128, seed=1)   # what the first correction draws
    truncated = ctx.loss(batch, batch_size=1)
    ZeroSum(stages=2, lean=lean, correction_batches=batches, correction_seqlen=128).refine(ctx, plan)
    corrected = ctx.loss(batch, batch_size=1)
    assert corrected < truncated - 1e-3, (truncated, corrected)
    assert any(f"zero-sum correction 1/1: loss on its {batches} x 32 tokens" in n for n in ctx.notes)


def test_the_correction_seed_picks_the_batches():
    from lowrank_builtin.zero_sum import _correction_windows

    model, data = _trained_tiny()
    assert not torch.equal(_correction_windows(data, 1, 128, seed=1), _correction_windows(data, 1, 128, seed=5))
    weights = []
    for seed in (1, 1, 5):
        ctx, plan = _context(copy.deepcopy(model), data)
        ZeroSum(stages=2, correction_seqlen=128, correction_seed=seed).refine(ctx, plan)
        weights.append(torch.cat([ctx.weight(n).flatten() for n in plan]))
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_lean_and_plain_corrections_agree():
    results = []
    for lean in (True, False):
        model, data = _trained_tiny()
        ctx, plan = _context(model, data)
        ZeroSum(stages=2, lean=lean, correction_seqlen=128).refine(ctx, plan)
        results.append({n: ctx.weight(n) for n in plan})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def test_correction_batches_are_whole_calibration_windows_cut_to_their_last_tokens():
    from lowrank_builtin.zero_sum import _correction_windows

    calib = torch.arange(6 * 10).reshape(6, 10)
    whole = _correction_windows(calib, 2, 1024, seed=1)      # longer than a window: the whole window
    assert whole.shape == (2, 10)
    assert all(any(torch.equal(row, c) for c in calib) for row in whole)
    cut = _correction_windows(calib, 3, 4, seed=1)           # the last 4 tokens of a window
    assert cut.shape == (3, 4)
    assert all(any(torch.equal(row, c[-4:]) for c in calib) for row in cut)
    assert torch.equal(_correction_windows(calib, 3, 4, seed=1), cut)   # seeded
    assert not torch.equal(_correction_windows(calib, 3, 4, seed=2), cut)   # correction_seed + stage


@pytest.mark.parametrize("dense", ["original", "refined"])
def test_a_dense_planned_matrix_is_reset_or_carried_and_corrected(dense):
    model, data = _trained_tiny()
    ctx, plan = _context(model, data)
    name = next(iter(plan))
    plan[name] = Selection.dense()
    moved = ctx.teacher[name] + 0.01 * torch.randn_like(ctx.teacher[name])
    ctx.set_weight(name, moved)   # as a matrix compressed and corrected in an earlier stage would be
    allocator = ZeroSum(stages=2, correction_seqlen=128, dense_matrices=dense)
    allocator.refine(ctx, plan)
    after = ctx.weight(name)
    assert allocator.restores_dense == (dense == "original")
    if dense == "original":
        torch.testing.assert_close(after, ctx.teacher[name], rtol=0, atol=0)
    else:   # not reset, and moved by the correction towards the teacher along its gradient
        assert not torch.equal(after, moved)
        assert not torch.equal(after, ctx.teacher[name])
        assert (after - ctx.teacher[name]).norm() < (moved - ctx.teacher[name]).norm()


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_stage_rounding_hands_on_weights_in_that_precision(precision):
    model, data = _trained_tiny()
    exact_ctx, plan = _context(copy.deepcopy(model), data)
    ZeroSum(stages=2, correction_seqlen=128).refine(exact_ctx, plan)
    ctx, plan = _context(model, data)
    ZeroSum(stages=2, correction_seqlen=128, stage_rounding=precision).refine(ctx, plan)
    dtype = getattr(torch, precision)
    moved = 0
    for name in plan:
        w, exact = ctx.module(name).weight.detach(), exact_ctx.module(name).weight.detach()
        assert w.dtype == exact.dtype                                   # the model keeps its dtype
        torch.testing.assert_close(w, w.to(dtype).to(w.dtype), rtol=0, atol=0)   # representable
        step = torch.finfo(dtype).eps * exact.abs().max().item()
        assert (w - exact).abs().max().item() < 20 * step              # only rounding apart
        moved += not torch.equal(w, exact)
    assert moved


# -- through the pipeline ---------------------------------------------------------------------------


def _max_saving(report):
    return max(sum(m.shape) for m in report.matrices)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compress_meets_the_ratio_within_one_component(arch):
    model = build(arch)
    recipe = lowrank.Recipe(scalings=["whitening"], allocator={"zero-sum": {"gradient_seqlen": 64}}, ratio=0.4)
    report = lowrank.compress(model, recipe, calibration(), progress=False)
    removed = report.target_params_before - report.target_params_after
    assert removed >= 0.4 * report.target_params_before - 1e-6
    assert removed - 0.4 * report.target_params_before < _max_saving(report)
    assert report.dense_matrices == sum(m.rank is None for m in report.matrices)
    for m in report.matrices:
        assert m.rank is None or m.rank <= breakeven_rank(*m.shape)
        assert m.params_after == stored_params(*m.shape, m.rank)
    assert any(n.startswith("gradient pass (scores, lean): 1 batch(es), 63 tokens") for n in report.notes)
    assert torch.isfinite(model(calibration(1, 16)).logits).all()


def test_plain_gradients_give_the_same_plan_as_lean():
    ranks = []
    for lean in (True, False):
        model = build("llama")
        recipe = lowrank.Recipe(allocator={"zero-sum": {"lean": lean, "gradient_seqlen": 64}}, ratio=0.3)
        report = lowrank.compress(model, recipe, calibration(), progress=False)
        assert any(f"(scores, {'lean' if lean else 'plain'})" in n for n in report.notes)
        ranks.append([m.rank for m in report.matrices])
    assert ranks[0] == ranks[1]


def test_default_gradient_windows_respect_the_position_limit():
    """2048 tokens for a GPT-2 with 64 positions: re-cut into 64-token windows from the calibration."""
    model = build("gpt2")
    report = lowrank.compress(model, lowrank.Recipe(allocator="zero-sum", ratio=0.3), calibration(8, 32), progress=False)
    assert any("scores, lean): 4 batch(es), 252 tokens" in n for n in report.notes)


def test_explicit_gradient_data_is_used():
    model = build("llama")
    recipe = lowrank.Recipe(allocator="zero-sum", ratio=0.3)
    report = lowrank.compress(model, recipe, calibration(), progress=False, gradient_data=calibration(2, 20, seed=5))
    assert any("2 batch(es), 38 tokens" in n for n in report.notes)


def test_stages_correct_and_dense_matrices_get_the_teacher_back():
    model = build("llama")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = lowrank.Recipe(allocator={"zero-sum": {"stages": 3, "gradient_seqlen": 64, "correction_seqlen": 64}},
                            ratio=0.4)
    report = lowrank.compress(model, recipe, calibration(), progress=False)
    assert sum("zero-sum correction" in n for n in report.notes) == 2
    assert sum("gradient pass (scores" in n for n in report.notes) == 3
    assert report.ratio_achieved >= 0.4
    assert report.dense_matrices > 0   # the tiny model's first block: see test_compress_meets...
    for m in report.matrices:
        if m.rank is None:
            torch.testing.assert_close(model.get_submodule(m.name).weight, original[m.name + ".weight"], rtol=0, atol=0)


@pytest.mark.parametrize("restores", [True, False])
def test_the_planner_restores_dense_matrices_only_when_the_allocator_asks(restores):
    model = build("llama")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Nudge(ZeroSum):
        name = "zero-sum"

        @property
        def restores_dense(self):
            return restores

        def refine(self, context, plan):
            for t in context.targets:   # every matrix moved, as a carried correction would move it
                context.set_weight(t.name, context.weight(t.name) * 1.001)

    recipe = lowrank.Recipe(allocator=Nudge(stages=2, gradient_seqlen=64), ratio=0.4)
    report = lowrank.compress(model, recipe, calibration(), progress=False)
    dense = [m.name for m in report.matrices if m.rank is None]
    assert dense
    for name in dense:
        same = torch.equal(model.get_submodule(name).weight, original[name + ".weight"])
        assert same == restores, name
    said = [n for n in report.notes if "stored dense keep the weights" in n]
    assert said == ([] if restores else [f"zero-sum: {len(dense)} of {len(dense)} matrices stored dense keep the "
                                         "weights its refinements left them, not their original ones"])


def test_failure_leaves_the_model_untouched():
    model = build("llama")
    before = copy.deepcopy(model.state_dict())

    class Boom(ZeroSum):
        name = "zero-sum"

        def refine(self, context, plan):
            super().refine(context, plan)
            raise RuntimeError("boom")

    recipe = lowrank.Recipe(allocator=Boom(stages=2, gradient_seqlen=32, correction_seqlen=32), ratio=0.3)
    with pytest.raises(RuntimeError, match="boom"):
        lowrank.compress(model, recipe, calibration(), progress=False)
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)


def test_recipe_round_trip_and_validation():
    recipe = lowrank.Recipe(allocator={"zero-sum": {"stages": 6, "keep_rank_ratio": 0.3, "order": 2}}, ratio=0.6)
    again = lowrank.Recipe.from_yaml(recipe.to_yaml())
    assert again.allocator == recipe.allocator and again.allocator.stages == 6
    with pytest.raises(lowrank.RecipeError, match="order"):
        lowrank.Recipe(allocator={"zero-sum": {"order": 3}})


def test_an_unreachable_ratio_with_a_rank_floor_is_an_error():
    spectra = [MatrixSpectrum("a", (10, 10), torch.ones(10, dtype=D), torch.zeros(10, dtype=D))]
    with pytest.raises(lowrank.CompressionError, match="keep_rank_ratio"):
        ZeroSum(keep_rank_ratio=1.0).allocate(spectra, lowrank.Budget(0.9, 100))


@pytest.mark.parametrize("ratio, floor", [(0.2, 0.0), (0.4, 0.0), (0.5, 0.3), (0.6, 0.3), (0.8, 0.15)])
def test_a_null_rank_floor_takes_the_published_one_for_the_ratio(ratio, floor):
    """keep_rank_ratio null: the released scripts' floor (0 at 0.2 and 0.4, 0.3 at 0.6; in between
    and above, the stated choice of ``published_keep_rank_ratio``), the same selections as the
    explicit setting."""
    from lowrank_builtin.zero_sum import published_keep_rank_ratio

    assert published_keep_rank_ratio(ratio) == pytest.approx(floor)
    floor = published_keep_rank_ratio(ratio)
    g = torch.Generator().manual_seed(0)
    shapes = [(96, 64), (64, 64), (128, 64)]
    spectra = [MatrixSpectrum(f"m{i}", sh, torch.rand(min(sh), generator=g, dtype=D).sort(descending=True).values,
                              -torch.rand(min(sh), generator=g, dtype=D) * 10.0 ** (-i))
               for i, sh in enumerate(shapes)]
    budget = lowrank.Budget(ratio, sum(a * b for a, b in shapes))
    assert ZeroSum(keep_rank_ratio=None).allocate(spectra, budget) == ZeroSum(keep_rank_ratio=floor).allocate(spectra, budget)
    if floor:   # the floor binds on the matrix the scores would starve
        assert ZeroSum(keep_rank_ratio=None).allocate(spectra, budget) != ZeroSum(keep_rank_ratio=0.0).allocate(spectra, budget)


@pytest.mark.parametrize("stages", [1, 2])
def test_original_inputs_truncate_exactly_the_scored_svds(stages, monkeypatch):
    """With inputs: original the compression pass applies the plan to the planner's own SVDs (no
    second profiling pass); the factors equal those of a run that profiles again."""
    from lowrank._engine import planner as planner_module

    original = build("llama")
    settings = {"gradient_seqlen": 64, "correction_seqlen": 64, "stages": stages}
    recipe = lowrank.Recipe(allocator={"zero-sum": settings}, ratio=0.4, inputs="original")
    reused, profiled = copy.deepcopy(original), copy.deepcopy(original)
    report = lowrank.compress(reused, recipe, calibration(8, 32), progress=False)
    assert any("truncated the SVDs the allocator scored in 3 block(s)" in n for n in report.notes)
    monkeypatch.setattr(planner_module.MatrixProfile, "kept_on_host", lambda self, shared: None)
    lowrank.compress(profiled, recipe, calibration(8, 32), progress=False)
    ranks = 0
    for (name, a), (_, b) in zip(reused.named_modules(), profiled.named_modules()):
        if isinstance(a, lowrank.LowRankLinear):
            ranks += 1
            assert a.rank == b.rank, name
            torch.testing.assert_close(a.A @ a.B, b.A @ b.B, rtol=1e-5, atol=1e-6)
    assert ranks > 0


def test_sequential_inputs_profile_again():
    recipe = lowrank.Recipe(allocator={"zero-sum": {"gradient_seqlen": 64}}, ratio=0.4)
    report = lowrank.compress(build("llama"), recipe, calibration(8, 32), progress=False)
    assert not any("truncated the SVDs the allocator scored" in n for n in report.notes)
