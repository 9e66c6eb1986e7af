"""Block-level factor training (``aa-svd``): it lowers the block's output error, never ends above
its start, composes with any allocation, is deterministic and leaves the block as it was on error."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, calibration

import lowrank
from lowrank import Selection, new_manager, reset_registry
from lowrank_builtin import block_training
from lowrank_builtin.block_training import AASVD
from lowrank_builtin.block_training_loop import lr_factor, split_batches

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = {"epochs": 4, "lr": 1e-3, "progress": False}


def _mse(context: lowrank.BlockCorrectionContext, targets: list[torch.Tensor]) -> float:
    with torch.no_grad():
        errors = [(context.run(x) - y).double().pow(2).sum() for x, y in zip(context.inputs.hidden, targets)]
    return float(sum(errors)) / sum(y.numel() for y in targets)


class Probe(AASVD):
    """``aa-svd`` that records the block's error on its targets, its factors and the dense
    weights before and after training."""

    name = "test-aa-probe"
    records: list[dict] = []

    def correct(self, context):
        pairs, _ = self.pairs(context)
        targets = [y for _, y in pairs]
        factors = {n: (m.A.detach().clone(), m.B.detach().clone(), m.A.dtype) for n, m in context.factored.items()}
        dense = {n: p.detach().clone() for n, p in context.block.named_parameters()
                 if not any(n.startswith(t.local + ".") for t in context.targets
                            if t.name in context.factored)}
        record = {"before": _mse(context, targets), "factors": factors, "dense": dense}
        super().correct(context)
        record.update(after=_mse(context, targets), note=context.notes[-1],
                      changed=any(not torch.equal(m.A, factors[n][0]) for n, m in context.factored.items()),
                      restored=all(torch.equal(m.A, factors[n][0]) and torch.equal(m.B, factors[n][1])
                                   for n, m in context.factored.items()),
                      dtypes=all(m.A.dtype == factors[n][2] for n, m in context.factored.items()),
                      dense_same=all(torch.equal(p, dense[n]) for n, p in context.block.named_parameters()
                                     if n in dense),
                      grad_flags=all(p.requires_grad for p in context.block.parameters()))
        Probe.records.append(record)


class Mixed(lowrank.Allocator):
    """Heterogeneous ranks, and the first matrix of every block left dense."""

    name = "test-mixed"

    def allocate(self, spectra, budget):
        out = []
        for i, s in enumerate(spectra):
            out.append(Selection.dense() if i == 0 else Selection.prefix(max(1, s.full_rank // (2 + i % 3))))
        return out


@pytest.fixture
def probe_registry():
    class Plugin:
        @lowrank.hookimpl
        def lowrank_register_corrections(self, register):
            register(Probe)

        @lowrank.hookimpl
        def lowrank_register_allocators(self, register):
            register(Mixed)

    pm = new_manager()
    pm.register(Plugin(), name="test-aa-svd")
    Probe.records.clear()
    yield reset_registry(pm)
    reset_registry()


def _run(settings=None, seed=0, **recipe):
    model = build("llama")
    spec = {"test-aa-probe": {**FAST, **(settings or {})}}
    recipe = lowrank.Recipe(corrections=[spec], ratio=recipe.pop("ratio", 0.4), seed=seed, **recipe)
    report = lowrank.compress(model, recipe, calibration(), batch_size=2, progress=False)
    return model, report


def test_training_lowers_the_block_error_and_reports_it(probe_registry):
    _, report = _run()
    assert len(Probe.records) == 3
    for r in Probe.records:
        assert r["after"] < 0.9 * r["before"], r["note"]
        assert r["changed"] and r["dtypes"] and r["dense_same"] and r["grad_flags"]
    notes = [n for n in report.notes if n.startswith("aa-svd block")]
    assert len(notes) == 3 and all("output MSE" in n and "steps" in n for n in notes)


def test_an_absurd_learning_rate_diverges_and_the_start_is_restored(probe_registry):
    _run({"lr": 50.0, "epochs": 3, "clip_norm": None})
    for r in Probe.records:
        assert r["restored"] and r["after"] == pytest.approx(r["before"], rel=1e-9)
        assert "start kept" in r["note"]


@pytest.mark.parametrize("settings", [{}, {"lr": 0.3}, {"holdout": 0.5, "patience": 1, "epochs": 6}])
def test_never_ends_above_its_start(probe_registry, settings):
    _run(settings)
    for r in Probe.records:
        assert r["after"] <= r["before"] * (1 + 1e-6), r["note"]


def test_held_out_batches_stop_early_and_are_reported(probe_registry):
    _run({"holdout": 0.5, "patience": 1, "epochs": 8, "lr": 0.05})
    assert all("held-out" in r["note"] for r in Probe.records)


def test_heterogeneous_ranks_and_dense_matrices(probe_registry):
    model, report = _run(allocator="test-mixed")
    dense = [m for m in report.matrices if m.rank is None]
    assert dense and len({m.rank for m in report.matrices if m.rank is not None}) > 1
    for r in Probe.records:
        assert r["dense_same"] and r["after"] < r["before"]
    ranks = {m.name: m.rank for m in report.matrices}
    for name, module in model.named_modules():
        if isinstance(module, lowrank.LowRankLinear):
            assert module.rank == module.A.shape[1] == module.B.shape[0] == ranks[name]


def test_composes_with_zero_sum(probe_registry):
    recipe = {"allocator": {"zero-sum": {"gradient_seqlen": 32}}}
    _, report = _run(ratio=0.5, **recipe)
    assert len(Probe.records) == 3 and all(r["after"] <= r["before"] for r in Probe.records)
    assert report.ratio_achieved > 0


def test_deterministic_under_the_seed():
    recipe = lowrank.Recipe(corrections=[{"aa-svd": {**FAST, "holdout": 0.25}}], ratio=0.4, seed=3)
    states = []
    for _ in range(2):
        model = build("llama")
        lowrank.compress(model, recipe, calibration(), batch_size=2, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("variant", [{"inputs": "original"}, {"target": "same-inputs"}])
def test_objective_variants_run(probe_registry, variant):
    _run(variant)
    assert all(r["after"] < r["before"] for r in Probe.records)


def test_original_inputs_recipe_has_one_stream(probe_registry):
    _run(inputs="original")
    assert all(r["after"] < r["before"] for r in Probe.records)


def test_low_precision_factors_train_in_float32_and_keep_their_dtype(probe_registry):
    model, _ = _run(dtype="bfloat16")
    for r in Probe.records:
        assert r["dtypes"] and r["after"] <= r["before"] * (1 + 1e-6)
    assert all(m.A.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, lowrank.LowRankLinear))


def test_an_error_leaves_the_block_as_it_was(probe_registry, monkeypatch):
    def broken(run, params, pairs, *args, **kwargs):
        with torch.no_grad():
            for p in params:
                p.mul_(3.0)
        raise RuntimeError("boom")

    monkeypatch.setattr(block_training, "train_block", broken)
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = lowrank.Recipe(corrections=[{"aa-svd": FAST}], ratio=0.4)
    seen = {}

    class Spy(AASVD):
        def correct(self, context):
            seen.update({n: (m.A.detach().clone(), m.B.detach().clone()) for n, m in context.factored.items()})
            try:
                super().correct(context)
            finally:
                seen["same"] = all(torch.equal(m.A, seen[n][0]) and torch.equal(m.B, seen[n][1])
                                   for n, m in context.factored.items())
                seen["flags"] = all(p.requires_grad for p in context.block.parameters())

    recipe.corrections = [Spy(FAST)]
    with pytest.raises(RuntimeError, match="boom"):
        lowrank.compress(model, recipe, calibration(), batch_size=2, progress=False)
    assert seen["same"] and seen["flags"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_schedule_defaults_by_device():
    class Ctx:
        device = torch.device("cuda")

    gpu = AASVD().schedule(Ctx, sequences_per_batch=8)
    assert (gpu.epochs, gpu.lr, gpu.group) == (25, 1e-4, 4)
    Ctx.device = torch.device("cpu")
    cpu = AASVD().schedule(Ctx, sequences_per_batch=8)
    assert (cpu.epochs, cpu.lr, cpu.group) == (block_training.CPU_EPOCHS, block_training.CPU_LR, 1)
    assert AASVD(epochs=3, lr=0.5, batch_size=12).schedule(Ctx, 4).group == 3


def test_lr_schedule_and_split():
    factors = [lr_factor(s, 100, 0.1, 0.1, True) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1) and max(factors) == pytest.approx(1.0)
    assert lr_factor(5, 10, 0.0, 0.1, False) == 1.0
    train, held = split_batches(8, 0.25, torch.Generator().manual_seed(0))
    assert len(held) == 2 and sorted(train + held) == list(range(8))
    assert split_batches(1, 0.5, torch.Generator().manual_seed(0)) == ([0], [])


def test_settings_are_validated():
    with pytest.raises(lowrank.RecipeError, match="inputs"):
        lowrank.Recipe(corrections=[{"aa-svd": {"inputs": "sideways"}}])
    with pytest.raises(lowrank.RecipeError, match="holdout"):
        lowrank.Recipe(corrections=[{"aa-svd": {"holdout": 0.9}}])
    recipe = lowrank.Recipe(corrections=["aa-svd"])
    assert lowrank.Recipe.from_yaml(recipe.to_yaml()) == recipe and AASVD.needs_reference
