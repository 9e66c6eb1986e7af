"""``lowrank.compress``: walk the decoder blocks one at a time and factor every targeted layer.

Per block: run the calibration batches through it with hooks that accumulate each targeted
layer's input statistics (float32), take the scaled SVD of each weight (float64), let the
allocator choose the kept components, swap the layer for a ``LowRankLinear`` (or keep it dense
when factoring would not save parameters), and run the recipe's corrections on the block. The next
block's inputs are the compressed block's outputs (``inputs="sequential"``) or the original
block's (``inputs="original"``).

Global allocators need every matrix's spectrum first: the :class:`GlobalPlanner` profiles the
uncompressed model, allocates, and the compression pass then applies the planned selections.

On any error the model is restored to what it was.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import Counter

import torch
from torch import nn

from .._contract.blocks import BlockInputs
from .._contract.correction import BlockCorrectionContext
from .._contract.errors import CompressionError
from .._contract.layers import LowRankLinear
from .._contract.model import count_parameters
from .._contract.recipe import Recipe
from .._contract.report import CompressionReport, MatrixReport
from .._contract.spectrum import Selection
from .._contract.stats import LayerStats
from .block_pass import BlockPass, CollectedBlock, MatrixProfile, checked_allocation
from .capture import capture_block_inputs
from .gradients import max_gpu_bytes, reset_gpu_peak
from .guard import Undo
from .planner import GlobalPlanner, gradient_statistics
from .setup import RunSetup, naming_block, on_device

__all__ = ["compress"]


class _CompressionPass:
    """The pass that changes the model: block by block, profile, select, swap, correct."""

    def __init__(self, setup: RunSetup) -> None:
        self.setup = setup
        self.block_pass = BlockPass(setup)
        self.kept: dict[str, MatrixProfile] | None = None   # the planner's scored SVDs, when reusable
        self.reused_blocks = 0

    def run(self, undo: Undo) -> None:
        setup = self.setup
        with setup.timer.phase("capture"):
            inputs = capture_block_inputs(setup.model, setup.blocks, setup.batches(), setup.device)
            inputs.hidden = setup.store.keep(inputs.hidden)   # to disk, when the run offloads them
        if setup.needs.gradients:
            setup.gradient_stats = gradient_statistics(setup)
        plan = None
        if setup.recipe.allocator.scope == "global":
            plan = setup.hooks.saved_plan()
            if plan is None:
                planner = GlobalPlanner(setup, self.block_pass)
                plan = planner.plan(inputs, undo)
                self.kept = planner.kept
                plan = setup.hooks.planned(plan)
        self.compress_blocks(inputs, plan, undo)
        if self.reused_blocks:
            setup.report.notes.append(f"truncated the SVDs the allocator scored in {self.reused_blocks} block(s) "
                                      "(inputs: original; no second profiling pass)")

    def compress_blocks(self, inputs: BlockInputs, plan: dict[str, Selection] | None, undo: Undo) -> None:
        setup = self.setup
        original = setup.recipe.inputs == "original"
        keep = original or setup.needs.block or setup.needs.reference or bool(setup.recipe.corrections)
        if setup.needs.reference and inputs.reference is None:
            inputs.reference = inputs.hidden   # one stream until the first block is compressed
        first = setup.hooks.start(inputs)  # a resumed run skips the finished blocks
        for index in setup.bar("compressing"):
            if index < first:
                continue
            setup.hooks.enter(index, "compressing")
            start = time.perf_counter()
            with naming_block(index, len(setup.blocks)), on_device(setup.blocks[index], setup.device) as block:
                reused = self._reused_profiles(block, index, plan)
                collected = self.block_pass.collect(block, index, inputs, keep_outputs=keep,
                                                    statistics=reused is None)
                profiles = reused or self.block_pass.profile(block, index, inputs, collected, plan)
                del collected.collector
                if plan is not None:
                    selections = {p.target.name: plan[p.target.name] for p in profiles}
                else:
                    selections = checked_allocation(setup, [p.spectrum for p in profiles])
                reports = self.block_pass.apply(block, profiles, selections, undo)
                del profiles
                if setup.recipe.corrections:
                    self._correct(block, index, inputs, collected)
                setup.report.matrices.extend(reports)
                inputs.hidden = collected.outputs if original else self.block_pass.forward(block, index, inputs)  # type: ignore[assignment]
                if inputs.reference is not None:
                    inputs.reference = collected.reference_outputs
            setup.hooks.leave(index, "compressing", inputs)
            if setup.progress and reports:
                _log_block(index, len(setup.blocks), reports, time.perf_counter() - start)

    def _reused_profiles(self, block: nn.Module, index: int,
                         plan: dict[str, Selection] | None) -> list[MatrixProfile] | None:
        """The planner's profiles of this block, when every planned selection is covered by them."""
        if self.kept is None or plan is None:
            return None
        kept = [self.kept.pop(t.name, None) for t in self.setup.targets_of(index)]
        if not kept or any(k is None or not k.covers(plan[k.target.name]) for k in kept):
            return None
        self.reused_blocks += 1
        with self.setup.timer.phase("factorization"):
            shared: dict[int, LayerStats] = {}
            return [k.restored(block, self.setup.device, shared) for k in kept]  # type: ignore[union-attr]

    def _correct(self, block: nn.Module, index: int, inputs: BlockInputs, collected: CollectedBlock) -> None:
        setup = self.setup
        targets = setup.targets_of(index)
        factored = {t.name: m for t in targets if isinstance(m := block.get_submodule(t.local), LowRankLinear)}
        outputs = collected.outputs or []
        if setup.recipe.inputs == "original":   # the compressed block sees the original stream itself
            reference_inputs, reference_outputs = inputs.hidden, outputs
        else:
            reference_inputs, reference_outputs = inputs.reference, collected.reference_outputs
        context = BlockCorrectionContext(block, index, targets, factored, inputs, outputs, setup.device,
                                         reference_inputs, reference_outputs, seed=setup.recipe.seed)
        with setup.timer.phase("corrections"):
            for correction in setup.recipe.corrections:
                ranks = {n: m.rank for n, m in factored.items()}
                correction.correct(context)
                grown = [n for n, m in factored.items() if m.A.shape[1] > ranks[n] or m.B.shape[0] > ranks[n]]
                if grown:
                    raise CompressionError(f"correction {correction.name!r} grew the rank of {grown[:3]}")
        setup.report.notes.extend(context.notes)


def _log_block(index: int, n: int, reports: list[MatrixReport], seconds: float) -> None:
    from tqdm.auto import tqdm

    ranks = " ".join(f"{r.name.rsplit('.', 1)[-1]}={'dense' if r.rank is None else r.rank}" for r in reports)
    err = sum(r.activation_error for r in reports) / len(reports)
    tqdm.write(f"block {index + 1}/{n}: {ranks} | mean rel. activation error {err:.4f} | {seconds:.1f}s", file=sys.stderr)


def _check_arguments(recipe: Recipe, calibration: torch.Tensor | None, batch_size: int) -> None:
    if calibration is None:
        raise CompressionError("calibration: expected token ids (windows x tokens); see lowrank.data.calibration_windows")
    if not isinstance(recipe, Recipe):
        raise CompressionError(f"recipe: expected a lowrank.Recipe, got {type(recipe).__name__}")
    if batch_size < 1:
        raise CompressionError(f"batch_size: expected a positive integer, got {batch_size}")


def compress(model: nn.Module, recipe: Recipe | None = None, calibration: torch.Tensor | None = None, *,
             batch_size: int = 8, progress: bool = True, gradient_data: torch.Tensor | None = None) -> CompressionReport:
    """Compress ``model`` in place with ``recipe`` and return the report.

    Args:
        model: A Hugging Face causal LM built from ``nn.Linear`` (or GPT-2's ``Conv1D``).
        recipe: What to do; the default is the registered defaults (whitening + uniform ranks) at
            ratio 0.2.
        calibration: Token ids, a (windows x tokens) integer tensor.
        batch_size: Windows per forward pass.
        progress: Show a bar over blocks and a line per block.
        gradient_data: Token windows for the calibration-loss gradients that some strategies use
            (default: the calibration windows, re-cut to the length the strategy asks for).

    Returns:
        The report, also stored as ``model.lowrank_report`` (and the recipe as
        ``model.lowrank_recipe``; the exporters read them).

    Raises:
        CompressionError: Bad input; the model is left unchanged when anything fails.
    """
    recipe = recipe if recipe is not None else Recipe()
    _check_arguments(recipe, calibration, batch_size)
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        setup = RunSetup.create(model, recipe, calibration, batch_size, progress, gradient_data)
    except BaseException:
        model.train(was_training)
        raise
    setup.report.model_params_before = count_parameters(model)
    undo = Undo(model)
    reset_gpu_peak(setup.device)
    try:
        _CompressionPass(setup).run(undo)
    except BaseException:
        undo.rollback()
        model.train(was_training)
        raise
    model.train(was_training)
    return _finish_report(model, setup, recipe, time.perf_counter() - started)


def _finish_report(model: nn.Module, setup: RunSetup, recipe: Recipe, seconds: float) -> CompressionReport:
    report = setup.report
    report.model_params_after = count_parameters(model)
    report.timings = setup.timer.report(seconds)
    report.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if setup.device.type == "cuda":
        report.notes.append(f"peak GPU memory {max_gpu_bytes(setup.device) / 2**20:.0f} MiB")
    report.notes.extend(sorted({n for m in report.matrices for n in m.notes}))
    methods = Counter(m.factorization for m in report.matrices if m.factorization)
    report.notes.append("factorization: " + ", ".join(f"{n} {k}" for k, n in sorted(methods.items()))
                        + f"; {torch.get_num_threads()} torch threads on {setup.device}")
    model.lowrank_report = report  # type: ignore[assignment]
    model.lowrank_recipe = recipe  # type: ignore[assignment]
    return report
