"""SoCo: exact mask accounting, the reparametrisation, the KL, each stage's progress, the pipeline."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from tiny_models import build, calibration

import lowrank
from lowrank import LayerStats, breakeven_rank, find_targets, scaled_svd, stored_params, weight_of
from lowrank_builtin import Identity, Whitening
from lowrank_builtin.soco import CPU, FULL, SoCo, SoCoConfig, resolved, spectral_layers
from lowrank_builtin.soco_init import first_order_gain, placed_logits, zero_sum_priority
from lowrank_builtin.soco_stages import Trainer
from lowrank_builtin.soco_train import (
    Layout,
    hard_mask,
    soft_params,
    swapped,
    teacher_cache,
    topk_kl,
)
from lowrank_builtin.zero_sum import component_floor, published_keep_rank_ratio, zero_sum_ranks

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = {"steps": [8, 8, 6], "batch_windows": 4, "lr": 0.2, "remask_every": 3, "progress": False}


def layout_of(shapes):
    return Layout(tuple(f"m{i}" for i in range(len(shapes))), tuple(shapes), tuple(min(s) for s in shapes))


shapes_st = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=6)


@given(shapes=shapes_st, ratio=st.floats(0.02, 0.9), seed=st.integers(0, 2**16))
def test_hard_mask_accounting_is_exact(shapes, ratio, seed):
    """Stored parameters are exactly the engine's count, within the budget, by less than one
    component's saving; dense where the kept rank stays above break-even; best scores kept."""
    layout = layout_of(shapes)
    dense = layout.dense_params
    allowed = lowrank.Budget(ratio, dense).allowed_params
    assume(sum(stored_params(m, n, 1) for m, n in shapes) <= allowed)
    scores = torch.randn(layout.offsets[-1], generator=torch.Generator().manual_seed(seed))
    mask = hard_mask(layout, scores, allowed)
    keep = layout.split(mask.keep)
    counted = 0
    for (m, n), k, rank, is_dense, sc in zip(shapes, keep, mask.ranks, mask.dense, layout.split(scores)):
        assert is_dense == (rank > breakeven_rank(m, n))
        if is_dense:
            assert bool(k.all())
            counted += m * n
        else:
            assert int(k.sum()) == rank
            counted += rank * (m + n)
            if 0 < rank < k.numel():
                assert float(sc[k].min()) >= float(sc[~k].max())
    assert counted == mask.params == sum(stored_params(m, n, None if d else r)
                                         for (m, n), r, d in zip(shapes, mask.ranks, mask.dense))
    assert mask.params <= allowed
    if mask.params < dense:
        assert allowed - mask.params < max(m + n for m, n in shapes)


def test_hard_mask_keeps_a_matrix_dense_when_it_stays_above_break_even():
    """One matrix whose components all matter more: it keeps everything and stores m n."""
    layout = layout_of([(20, 20), (30, 10)])
    scores = torch.cat([torch.full((20,), 5.0), torch.linspace(0, 1, 10)])
    allowed = lowrank.Budget(0.2, layout.dense_params).allowed_params
    mask = hard_mask(layout, scores, allowed)
    assert mask.dense == (True, False) and mask.params == 400 + mask.ranks[1] * 40 <= allowed


@given(shapes=shapes_st, seed=st.integers(0, 2**16))
def test_soft_params_exact_at_binary_gates_with_linear_slope(shapes, seed):
    layout = layout_of(shapes)
    g = (torch.rand(layout.offsets[-1], generator=torch.Generator().manual_seed(seed)) > 0.5).double()
    g.requires_grad_(True)
    value = soft_params(layout, g)
    expected = sum(stored_params(m, n, int(k.sum())) for (m, n), k in zip(shapes, layout.split(g.detach())))
    assert float(value.detach()) == expected
    value.backward()
    slope = torch.cat([torch.full((min(m, n),), float(m + n), dtype=torch.float64) for m, n in shapes])
    torch.testing.assert_close(g.grad, slope)


def _profiles(model, windows, scaling):
    """Scaled SVDs of every target with the Gram matrix of its real inputs."""
    targets = find_targets(model, None, [])
    grams, hooks = {}, []
    for t in targets:
        def hook(mod, args, _out, name=t.name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        hooks.append(model.get_submodule(t.name).register_forward_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    tokens = windows.numel()
    return targets, {t.name: scaled_svd(weight_of(model.get_submodule(t.name)).detach().double(),
                                        LayerStats(grams[t.name], tokens), [scaling]) for t in targets}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_rank_at_unit_scale_is_the_original_model(arch):
    model, windows = build(arch), calibration(4, 16)
    targets, profiles = _profiles(model, windows, Whitening())
    with torch.no_grad():
        before = model(windows).logits
        layers = spectral_layers(profiles, model, [t.name for t in targets], torch.device("cpu"))
        with swapped(model, dict(layers)):
            after = model(windows).logits
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(windows).logits, before)   # swapped back


class FixedLogits:
    """A stand-in model: row i of ``ids`` gets the logits of sequence ids[i, 0]."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, ids, use_cache=False):
        return type("Out", (), {"logits": self.logits[ids[:, 0]]})()


def test_topk_kl_is_exact_with_every_token_and_zero_for_the_teacher():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.tensor([[0], [1]])
    cache = teacher_cache(FixedLogits(p_logits), ids, 11, torch.device("cpu"))
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    full = (logp.exp() * (logp - logq)).sum(-1).mean()
    torch.testing.assert_close(topk_kl(q_logits, cache.logp, cache.index, cache.log_rest), full, atol=1e-5, rtol=1e-4)
    assert abs(float(topk_kl(p_logits, cache.logp, cache.index, cache.log_rest))) < 1e-5
    small = teacher_cache(FixedLogits(p_logits), ids, 3, torch.device("cpu"))
    coarse = float(topk_kl(q_logits, small.logp, small.index, small.log_rest))
    assert 0 <= coarse <= float(full) + 1e-6   # coarsening never raises a KL


def test_each_stage_lowers_its_objective():
    """Full batch, fixed multiplier (dual_lr 0, no ramp): first vs last step of every stage."""
    torch.manual_seed(0)
    model, windows = build("llama"), calibration(6, 24)
    targets, profiles = _profiles(model, windows, Identity())
    names = [t.name for t in targets]
    layout = Layout(tuple(names), tuple(t.shape for t in targets), tuple(min(t.shape) for t in targets))
    allowed = lowrank.Budget(0.4, layout.dense_params).allowed_params
    cfg = resolved(SoCoConfig(**{**FAST, "steps": (15, 15, 10), "batch_windows": 6, "dual_lr": 0.0, "warmup": 0.0}), torch.device("cpu"))
    cache = teacher_cache(model, windows, 200, torch.device("cpu"))
    layers = spectral_layers(profiles, model, names, torch.device("cpu"))
    outcome = Trainer(model, layers, layout, cache, windows, allowed, cfg, 0, torch.device("cpu")).run()
    first, second, third = outcome.logs
    assert first.objective_last < first.objective_first, first
    assert second.objective_last <= second.objective_first, second   # keeps its best mask
    assert third.objective_last < third.objective_first, third
    assert outcome.mask.params <= allowed
    assert all(not p.requires_grad for p in layers["model.layers.0.mlp.up_proj"].buffers())


class Capturing(SoCo):
    """SoCo that remembers the weights it wrote (W') for the check below."""

    written: dict[str, torch.Tensor] = {}

    def _write(self, context, layout, outcome):
        super()._write(context, layout, outcome)
        Capturing.written = {n: context.weight(n) for n in layout.names}


def test_pipeline_keeps_exactly_the_learned_components_on_budget(tmp_path):
    model, windows = build("llama"), calibration(8, 32)
    dense_before = {t.name: weight_of(model.get_submodule(t.name)).detach().clone() for t in find_targets(model, None, [])}
    record = tmp_path / "soco.json"
    recipe = lowrank.Recipe(scalings=["whitening"], allocator=Capturing({**FAST, "record": str(record)}),
                            ratio=0.4, seed=1)
    report = lowrank.compress(model, recipe, windows, progress=False)
    budget = lowrank.Budget(0.4, report.target_params_before)
    assert report.target_params_after <= budget.allowed_params
    assert report.ratio_achieved - 0.4 < max(m + n for m, n in (r.shape for r in report.matrices)) / budget.dense_params
    import json

    data = json.loads(record.read_text())["matrices"]
    for r in report.matrices:
        module = model.get_submodule(r.name)
        if data[r.name]["dense"]:
            assert r.rank is None
            torch.testing.assert_close(weight_of(module), dense_before[r.name])
        else:
            assert r.rank == sum(data[r.name]["mask"])
            w = (module.A @ module.B).detach().double()
            written = Capturing.written[r.name]
            assert float((w - written).norm() / written.norm()) < 1e-4
    assert any(n.startswith("soco mask:") for n in report.notes)


def test_deterministic_under_the_seed_and_registered():
    results = []
    for _ in range(2):
        model, windows = build("llama"), calibration(6, 16)
        recipe = lowrank.Recipe(scalings=["whitening"], allocator={"soco": FAST}, ratio=0.5, seed=7)
        report = lowrank.compress(model, recipe, windows, progress=False)
        results.append(([m.rank for m in report.matrices], model(windows).logits))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert isinstance(lowrank.Recipe(allocator="soco").allocator, SoCo)


def test_config_rejects_bad_settings():
    with pytest.raises(lowrank.RecipeError):
        lowrank.Recipe(allocator={"soco": {"order": "random"}})
    with pytest.raises(lowrank.RecipeError):
        lowrank.Recipe(allocator={"soco": {"batch_windows": 0}})


def test_schedule_follows_the_device_unless_set():
    """Null schedule settings: the full setting on CUDA, the CPU-sized one elsewhere; a set value wins."""
    on_gpu, on_cpu = resolved(SoCoConfig(), torch.device("cuda")), resolved(SoCoConfig(), torch.device("cpu"))
    assert {k: getattr(on_gpu, k) for k in FULL} == FULL and {k: getattr(on_cpu, k) for k in CPU} == CPU
    assert FULL["steps"] == (200, 200, 100) and sum(CPU["steps"]) < sum(FULL["steps"]) / 5
    mine = resolved(SoCoConfig(steps=(1, 2, 3), lr=0.7), torch.device("cuda"))
    assert mine.steps == (1, 2, 3) and mine.lr == 0.7 and mine.batch_windows == FULL["batch_windows"]
    with pytest.raises(ValueError, match="null"):
        Trainer(None, {}, None, None, torch.zeros(1, 4), 0, SoCoConfig(), 0, torch.device("cpu"))


# -- the warm start (soco_init) --------------------------------------------------------------------


@given(shapes=shapes_st, ratio=st.floats(0.02, 0.9), seed=st.integers(0, 2**16))
def test_placed_logits_reproduce_the_priority_mask(shapes, ratio, seed):
    """The logits' own hard mask is the priority's; kept gates above 1/2, pruned below, in order."""
    layout = layout_of(shapes)
    allowed = lowrank.Budget(ratio, layout.dense_params).allowed_params
    assume(sum(stored_params(m, n, 1) for m, n in shapes) <= allowed)
    priority = torch.randn(layout.offsets[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta, mask = placed_logits(layout, priority, allowed, spread=3.0)
    again = hard_mask(layout, theta, allowed)
    assert torch.equal(again.keep, mask.keep) and again.params == mask.params
    assert bool((theta[mask.keep] > 0).all()) and bool((theta[~mask.keep] < 0).all())
    assert float(theta.abs().max()) <= 3.0
    pruned = ~mask.keep
    if int(pruned.sum()) > 1:   # order kept within a side
        p, t = priority[pruned], theta[pruned]
        assert bool((t[p.argsort()].diff() > 0).all())


def test_first_order_gain_is_the_loss_change_of_pruning():
    """Delta_i = -dL/ds_i: a small step of s_i down changes the cross-entropy by eps * Delta_i."""
    torch.manual_seed(0)
    model, windows = build("llama"), calibration(2, 16)
    targets, profiles = _profiles(model, windows, Whitening())
    names = [t.name for t in targets]
    layout = Layout(tuple(names), tuple(t.shape for t in targets), tuple(min(t.shape) for t in targets))
    layers = spectral_layers(profiles, model, names, torch.device("cpu"))
    cache = teacher_cache(model, windows, 50, torch.device("cpu"))
    cfg = resolved(SoCoConfig(**FAST), torch.device("cpu"))
    trainer = Trainer(model, layers, layout, cache, windows, layout.dense_params // 2, cfg, 0, torch.device("cpu"))

    def loss(scale):
        trainer.set_scales(scale)
        total = 0.0
        for i in range(2):
            logits = model(windows[i:i + 1], use_cache=False).logits[:, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             windows[i:i + 1, 1:].reshape(-1)))
        return total / 2

    with swapped(model, dict(layers)), torch.no_grad():
        with torch.enable_grad():
            gain = first_order_gain(trainer, 2)
        ones = torch.ones(layout.offsets[-1])
        base, eps = loss(ones), 1e-2
        for i in gain.abs().argsort(descending=True)[:3].tolist():
            step = ones.clone()
            step[i] -= eps
            assert abs((loss(step) - base) - eps * float(gain[i])) < 0.2 * eps * abs(float(gain[i])) + 1e-6


@pytest.mark.parametrize("init", ["zero-sum", "first-order", "uniform"])
def test_stage_two_never_hands_on_a_mask_worse_than_its_start(init):
    """The mask stage 2 hands on is at least as good, on its validation windows, as the warm
    start's and as its own first mask."""
    torch.manual_seed(0)
    model, windows = build("llama"), calibration(6, 24)
    targets, profiles = _profiles(model, windows, Whitening())
    names = [t.name for t in targets]
    layout = Layout(tuple(names), tuple(t.shape for t in targets), tuple(min(t.shape) for t in targets))
    allowed = lowrank.Budget(0.4, layout.dense_params).allowed_params
    cfg = resolved(SoCoConfig(**{**FAST, "init": init, "steps": (4, 9, 0), "batch_windows": 2}), torch.device("cpu"))
    cache = teacher_cache(model, windows, 200, torch.device("cpu"))
    layers = spectral_layers(profiles, model, names, torch.device("cpu"))
    trainer = Trainer(model, layers, layout, cache, windows, allowed, cfg, 0, torch.device("cpu"))
    outcome = trainer.run()
    second = outcome.logs[1]
    assert second.objective_last <= second.objective_first
    with swapped(model, dict(layers)):
        if init != "uniform":
            assert trainer.start is not None
            assert second.objective_last <= trainer.judge(trainer.start) + 1e-6
        assert abs(trainer.judge(outcome.mask) - second.objective_last) < 1e-5
    assert outcome.mask.params <= allowed


@given(shapes=shapes_st, ratio=st.floats(0.05, 0.7), seed=st.integers(0, 2**16))
def test_zero_sum_start_is_the_zero_sum_plan(shapes, ratio, seed):
    """The placed logits of the zero-sum order give exactly zero-sum's ranks (prefixes, dense where
    it keeps a matrix dense) on the same scores and budget."""
    layout = layout_of(shapes)
    allowed = lowrank.Budget(ratio, layout.dense_params).allowed_params
    gain = torch.randn(layout.offsets[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    floors = [component_floor(s, published_keep_rank_ratio(ratio)) for s in shapes]
    ranks, _ = zero_sum_ranks(shapes, [g.tolist() for g in layout.split(gain)], allowed, floors)
    assume(sum(stored_params(*s, k) for s, k in zip(shapes, ranks)) <= allowed)
    priority = zero_sum_priority(layout, gain, ratio)
    _theta, mask = placed_logits(layout, priority, allowed, spread=3.0)
    for j, (keep, shape) in enumerate(zip(layout.split(mask.keep), shapes)):
        if ranks[j] > breakeven_rank(*shape):
            assert mask.dense[j]
        else:
            assert not mask.dense[j] and mask.ranks[j] == ranks[j]
            assert bool(keep[:ranks[j]].all()) and not bool(keep[ranks[j]:].any())


def test_report_and_inspect_carry_the_learned_ranks_and_scales(tmp_path, monkeypatch):
    """SoCo's per-matrix numbers reach the report, survive save/load, and inspect prints them."""
    import json

    from click.testing import CliRunner

    import lowrank.cli._common as common
    from lowrank import inspect_model
    from lowrank.cli import main

    model, windows = build("llama"), calibration(6, 16)
    report = lowrank.compress(model, lowrank.Recipe(scalings=["whitening"], allocator={"soco": FAST}, ratio=0.4,
                                                    seed=3), windows, progress=False)
    for m in report.matrices:
        d = m.diagnostics
        assert d["soco.dense"] == float(m.rank is None)
        if m.rank is not None:
            assert d["soco.learned_rank"] == m.rank and 0 <= d["soco.outside_prefix"] <= m.rank
            assert 0 < d["soco.scale_min"] <= d["soco.scale_mean"] <= d["soco.scale_max"]
        assert -1.0 <= d["soco.order_agreement"] <= 1.0
    lowrank.save(model, tmp_path / "out")
    loaded = lowrank.load(tmp_path / "out")
    rows = {r.name: r for r in inspect_model(loaded)}
    assert rows[report.matrices[0].name].diagnostics == report.matrices[0].diagnostics
    monkeypatch.setattr(common, "open_model", lambda name, device="auto": (loaded, None, "cpu"))
    shown = CliRunner().invoke(main, ["inspect", "whatever", "--diagnostics"])
    assert shown.exit_code == 0, shown.output
    assert "soco.learned_rank" in shown.output and "soco.order_agreement" in shown.output
    data = json.loads(CliRunner().invoke(main, ["inspect", "whatever", "--json"]).output)
    assert "soco.scale_max" in json.dumps(data)


@pytest.mark.parametrize("scalings,corrections", [
    (["whitening", {"sigmascale": {"steps": 2}}], []),
    (["whitening"], [{"aa-svd": {"epochs": 1, "progress": False}}]),
])
def test_composes_after_sigmascale_and_before_corrections(scalings, corrections):
    """SoCo after a learned scaling, and followed by block training: on budget, a finite model."""
    model, windows = build("llama"), calibration(6, 16)
    recipe = lowrank.Recipe(scalings=scalings, allocator={"soco": FAST}, corrections=corrections, ratio=0.4, seed=2)
    report = lowrank.compress(model, recipe, windows, progress=False)
    assert report.target_params_after <= lowrank.Budget(0.4, report.target_params_before).allowed_params
    assert any(n.startswith("soco mask:") for n in report.notes)
    assert report.timings["refinement"] > 0   # the training has its own phase in the report
    assert bool(torch.isfinite(model(windows).logits).all())
