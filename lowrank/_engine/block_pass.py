"""One decoder block: collect its inputs' statistics, take the scaled SVDs, swap in the factors.

The compression pass and the global planner's profiling pass both walk the blocks with this
class; it holds no state of its own beyond the run's :class:`~lowrank._engine.setup.RunSetup`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._contract.accounting import breakeven_rank, uniform_rank
from .._contract.allocator import Allocator
from .._contract.blocks import BlockContext, BlockInputs, run_block
from .._contract.diagnostics import effective_rank, participation_ratio
from .._contract.errors import CompressionError
from .._contract.factors import ScaledSVD, activation_error, build_factors
from .._contract.layers import factored_like
from .._contract.model import Target, weight_of
from .._contract.report import MatrixReport
from .._contract.spectrum import Budget, MatrixSpectrum, Selection
from .._contract.stats import LayerStats
from .compensation import CrossCollector, compensated_target
from .device import STORAGE_DTYPES
from .factorize import scaled_svd_batch
from .guard import Undo
from .offload import same_stream
from .setup import RunSetup
from .stats import StatsCollector
from .svd import needed_components

__all__ = ["BlockPass", "CollectedBlock", "MatrixProfile", "checked_allocation"]


@dataclass
class CollectedBlock:
    """A block's statistics, and its outputs on the calibration batches when they were kept.

    Attributes:
        collector: The statistics of the block's inputs (the compressed stream's, when sequential).
        outputs: The uncompressed block's outputs on ``inputs.hidden``, when kept.
        reference_outputs: The uncompressed block's outputs on ``inputs.reference`` (the original
            model's next hidden states), when the run carries the reference stream.
        cross: The cross-covariance of original and compressed inputs (compensated target).
    """

    collector: StatsCollector
    outputs: Sequence[torch.Tensor] | None
    reference_outputs: Sequence[torch.Tensor] | None = None
    cross: CrossCollector | None = None


@dataclass
class MatrixProfile:
    """One targeted matrix after its scaled SVD: everything its allocation and factors need."""

    target: Target
    svd: ScaledSVD
    stats: LayerStats
    weight: torch.Tensor          # out x in, float64, on the compute device
    spectrum: MatrixSpectrum

    def kept_on_host(self, shared: dict[int, LayerStats]) -> "MatrixProfile":
        """A CPU copy that waits for the compression pass: singular vectors up to the break-even
        rank only (a plan that keeps more leaves the matrix dense), the Gram matrix in float32 for
        the activation error (one copy per shared input, through ``shared``), no weight."""
        stats = shared.get(id(self.stats.gram))
        if stats is None:
            stats = shared[id(self.stats.gram)] = LayerStats(self.stats.gram.to("cpu", torch.float32), self.stats.n_tokens)
        svd = self.svd.leading(breakeven_rank(*self.target.shape)).to("cpu")
        return MatrixProfile(self.target, svd, stats, torch.empty(0), self.spectrum)

    def restored(self, block: nn.Module, device: torch.device, shared: dict[int, LayerStats]) -> "MatrixProfile":
        """Back on ``device`` with the layer's current weight, ready for ``BlockPass.apply`` (one
        device copy per shared input, through ``shared``)."""
        weight = weight_of(block.get_submodule(self.target.local)).detach().to(device, torch.float64)
        stats = shared.get(id(self.stats))
        if stats is None:
            stats = shared[id(self.stats)] = LayerStats(self.stats.gram.to(device, torch.float64), self.stats.n_tokens)
        return MatrixProfile(self.target, self.svd.to(device), stats, weight, self.spectrum)

    def covers(self, selection: Selection) -> bool:
        """Whether the stored singular vectors include every component ``selection`` keeps."""
        if selection.stays_dense(self.target.shape) or not selection.indices:
            return True
        return max(selection.indices) < self.svd.stored_components


def checked_allocation(setup: RunSetup, spectra: list[MatrixSpectrum],
                       allocator: Allocator | None = None) -> dict[str, Selection]:
    """``allocator`` (default: the recipe's) on ``spectra``, its answer checked: one selection per
    matrix, components in range."""
    allocator = allocator if allocator is not None else setup.recipe.allocator
    budget = Budget(setup.recipe.ratio, sum(s.dense_params for s in spectra))
    selections = allocator.allocate(spectra, budget)
    if len(selections) != len(spectra):
        raise CompressionError(f"allocator {allocator.name!r} returned {len(selections)} selections for "
                               f"{len(spectra)} matrices")
    for spec, sel in zip(spectra, selections):
        if sel.indices is not None and any(not 0 <= i < spec.full_rank for i in sel.indices):
            raise CompressionError(f"allocator {allocator.name!r} selected components outside "
                                   f"[0, {spec.full_rank}) for {spec.name}")
    return {s.name: sel for s, sel in zip(spectra, selections)}


class BlockPass:
    """The steps of one block, shared by the planner's profiling pass and the compression pass."""

    def __init__(self, setup: RunSetup) -> None:
        self.setup = setup

    def collect(self, block: nn.Module, index: int, inputs: BlockInputs, keep_outputs: bool,
                statistics: bool = True) -> CollectedBlock:
        """Run the calibration batches through ``block`` with statistics hooks on its targets
        (without them when ``statistics`` is False: only the outputs are wanted)."""
        setup = self.setup
        collector = StatsCollector(want_abs_mean=setup.needs.abs_mean, want_inputs=setup.needs.inputs)
        targets = setup.targets_of(index) if statistics else []
        modules = {t.name: block.get_submodule(t.local) for t in targets}
        store = setup.store
        outputs = store.writer() if keep_outputs else None
        reference = inputs.reference if setup.needs.reference else None
        diverged = reference is not None and not same_stream(reference, inputs.hidden)
        cross = CrossCollector() if setup.needs.cross and diverged and statistics else None
        reference_outputs = store.writer() if diverged else None
        reference_seconds = 0.0
        with setup.timer.phase("forward"), torch.no_grad(), collector.attached(modules), \
                (cross.attached(modules) if cross is not None else contextlib.nullcontext()):
            for b, hidden in enumerate(inputs.hidden):
                if reference_outputs is not None:   # the original stream first: the cross hooks keep its inputs
                    started = time.perf_counter()
                    with collector.skipped(), (cross.original_stream() if cross is not None else contextlib.nullcontext()):
                        reference_outputs.append(run_block(block, reference[b], *inputs.args_for(index, hidden)))  # type: ignore[index]
                    reference_seconds += time.perf_counter() - started
                collector.next_batch()
                out = run_block(block, hidden, *inputs.args_for(index, hidden))
                if outputs is not None:
                    outputs.append(out)
        hooks = collector.seconds + (cross.seconds if cross is not None else 0.0)
        setup.timer.add("forward", -hooks - reference_seconds)   # the hooks' time is statistics, not forward
        setup.timer.add("statistics", hooks)
        setup.timer.add("forward_reference", reference_seconds)
        kept = store.done(outputs) if outputs is not None else None
        reference_kept = store.done(reference_outputs) if reference_outputs is not None else None
        if reference is not None and not diverged:
            reference_kept = kept   # nothing compressed upstream yet: one stream
        return CollectedBlock(collector, kept, reference_kept, cross)

    def _stats_for(self, target: Target, block: nn.Module, index: int, inputs: BlockInputs,
                   collected: CollectedBlock) -> LayerStats:
        stats = collected.collector.stats(target.name)
        grads = self.setup.gradient_stats.get(target.name)
        want_block = self.setup.needs.block and collected.outputs is not None
        if grads is None and not want_block:
            return stats
        # a per-matrix view that still shares the input's Gram matrix and cache
        device = self.setup.device
        return dataclasses.replace(
            stats,
            grad_row_sq=grads.row_sq.to(device, torch.float64) if grads is not None else stats.grad_row_sq,
            grad_col_sq=grads.col_sq.to(device, torch.float64) if grads is not None else stats.grad_col_sq,
            block=BlockContext(block, target.local, inputs, index, collected.outputs) if want_block else stats.block,
        )

    def profile(self, block: nn.Module, index: int, inputs: BlockInputs, collected: CollectedBlock,
                plan: dict[str, Selection] | None) -> list[MatrixProfile]:
        """The scaled SVD of every target of the block (ranks from ``plan`` or the allocator's hint)."""
        setup = self.setup
        with setup.timer.phase("factorization"):
            targets = setup.targets_of(index)
            weights = [weight_of(block.get_submodule(t.local)).detach().to(setup.device, torch.float64)
                       for t in targets]
            stats = [self._stats_for(t, block, index, inputs, collected) for t in targets]
            ranks = [plan[t.name].rank if plan is not None else setup.recipe.allocator.rank_hint(t.shape, setup.recipe.ratio)
                     for t in targets]
            accurate = [needed_components(t.shape, r) for t, r in zip(targets, ranks)]
            goals, notes, strengths = self._targets_to_fit(targets, weights, stats, collected, ranks)
            svds = scaled_svd_batch(goals, stats, setup.recipe.scalings, ranks, setup.recipe.factorization,
                                    accurate)
            for svd, note, strength in zip(svds, notes, strengths):
                svd.notes.extend(note)
                if strength is not None:
                    svd.diagnostics["compensation_strength"] = strength
            return [MatrixProfile(t, svd, st, w, MatrixSpectrum(t.name, t.shape, svd.s, None, index))
                    for t, svd, st, w in zip(targets, svds, stats, weights)]

    def _targets_to_fit(self, targets: list[Target], weights: list[torch.Tensor], stats: list[LayerStats],
                        collected: CollectedBlock, ranks: list[int | None],
                        ) -> tuple[list[torch.Tensor], list[list[str]], list[float | None]]:
        """The matrices to factor (each weight, or its compensated target W* when the run has one),
        their notes and the compensation strength used (``None`` for plain targets)."""
        if collected.cross is None:
            return weights, [[] for _ in weights], [None for _ in weights]
        recipe = self.setup.recipe
        strength = None if recipe.compensation == "adaptive" else recipe.compensation   # a float, checked
        goals, notes, strengths = [], [], []
        for t, w, st, rank in zip(targets, weights, stats, ranks):
            cross = collected.cross.cross(t.name)
            if cross is None:   # nothing was paired for this layer
                goals.append(w)
                notes.append([])
                strengths.append(None)
                continue
            note = []
            if strength is None and rank is None:   # the allocator decides after the SVD
                rank = uniform_rank(t.shape, recipe.ratio)
                note.append(f"compensation: adaptive strength chosen at the uniform rank {rank} "
                            "(the allocator sets ranks after the SVD)")
            target = compensated_target(w, cross, st.gram, strength, rank)
            goals.append(target.weight)
            notes.append(([target.note] if target.note else []) + note)
            strengths.append(target.strength)
        return goals, notes, strengths

    def apply(self, block: nn.Module, profiles: list[MatrixProfile], selections: dict[str, Selection],
              undo: Undo) -> list[MatrixReport]:
        """Swap every profiled layer for its factors (or keep it dense); one report per matrix."""
        reports = []
        for p in profiles:
            start = time.perf_counter()
            with self.setup.timer.phase("factorization"):
                report = self._apply_one(block, p, selections[p.target.name], undo)
            report.factorization_seconds = p.svd.seconds + time.perf_counter() - start
            reports.append(report)
        return reports

    def _apply_one(self, block: nn.Module, p: MatrixProfile, sel: Selection, undo: Undo) -> MatrixReport:
        t = p.target
        m, n = t.shape
        if sel.stays_dense(t.shape):
            rank, after, s_err, a_err = None, m * n, 0.0, 0.0
        else:
            module = block.get_submodule(t.local)
            a, b = build_factors(p.svd, sel)
            s_err = p.svd.spectrum_error(sel)
            a_err = activation_error(p.weight, a @ b, p.stats.covariance, dtype=torch.float32)   # a diagnostic
            policy = self.setup.recipe.dtype
            dtype = weight_of(module).dtype if policy == "auto" else STORAGE_DTYPES[policy]
            undo.swap(f"{self.setup.prefix}.{t.block}.{t.local}", factored_like(module, a, b, dtype))
            rank, after = sel.rank, sel.params(t.shape)
        report = MatrixReport(t.name, t.block, t.shape, rank, m * n, after, s_err, a_err,
                              effective_rank(p.svd.s), list(p.svd.notes), participation_ratio(p.svd.s),
                              diagnostics={**p.svd.diagnostics, **self.setup.matrix_diagnostics.get(t.name, {})},
                              factorization=p.svd.method)
        change = p.svd.spectrum_change
        if change is not None:
            for f in dataclasses.fields(change):
                setattr(report, f.name, getattr(change, f.name))
        return report

    def forward(self, block: nn.Module, index: int, inputs: BlockInputs) -> Sequence[torch.Tensor]:
        """The (compressed) block's outputs on its inputs: the next block's sequential inputs
        (each batch goes to the run's store as soon as it is computed)."""
        with self.setup.timer.phase("forward_next"), torch.no_grad():
            return self.setup.store.keep(run_block(block, h, *inputs.args_for(index, h)) for h in inputs.hidden)
