"""SoCo: exact mask accounting, the reparametrisation, the KL, each stage's progress, the pipeline."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from tiny_models import build, calibration

import lowrank
from lowrank import LayerStats, breakeven_rank, find_targets, scaled_svd, stored_params, weight_of
from lowrank_builtin import Identity, Whitening
from lowrank_builtin.soco import SoCo, SoCoConfig, spectral_layers
from lowrank_builtin.soco_stages import Trainer
from lowrank_builtin.soco_train import (
    Layout,
    hard_mask,
    soft_params,
    swapped,
    teacher_cache,
    topk_kl,
)

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
    cfg = SoCoConfig(**{**FAST, "steps": (15, 15, 10), "batch_windows": 6, "dual_lr": 0.0, "warmup": 0.0})
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
    assert not math.isnan(SoCoConfig().lr)
