"""The global planner: the passes a global allocator needs before anything is compressed.

``prepare`` once; then per stage a profiling pass over the uncompressed blocks (the same
:class:`~lowrank._engine.block_pass.BlockPass` the compression uses, with original inputs), a
gradient pass when the allocator scores components, the allocation, and between two stages the
allocator's ``refine`` on the whole model. The plan of the last stage is what gets compressed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .._contract.allocator import Allocator
from .._contract.blocks import BlockInputs
from .._contract.context import GradientPassInfo
from .._contract.factors import ScaledSVD
from .._contract.model import weight_of
from .._contract.spectrum import MatrixSpectrum, Selection
from .._contract.stats import LayerStats
from .block_pass import BlockPass, MatrixProfile, checked_allocation
from .contexts import EngineModelContext, EngineRefineContext
from .gradients_blockwise import run_gradient_pass
from .guard import Undo
from .setup import GradientStats, RunSetup, model_on_device, naming_block, on_device

__all__ = ["GlobalPlanner", "gradient_statistics", "note_gradient_pass"]


def note_gradient_pass(setup: RunSetup, what: str, info: GradientPassInfo) -> None:
    """A line in the report about one gradient pass."""
    peak = f", peak GPU {info.peak_gpu_bytes / 2**20:.0f} MiB" if info.peak_gpu_bytes else ""
    setup.report.notes.append(f"gradient pass ({what}, {'lean' if info.lean else 'plain'}): {info.batches} "
                              f"batch(es), {info.tokens} tokens, loss {info.loss:.4f}{peak}")


def gradient_statistics(setup: RunSetup) -> dict[str, GradientStats]:
    """Squared calibration-loss gradients per row and column, for scalings that request
    ``grad_row_sq`` / ``grad_col_sq`` (Fisher weighting)."""
    sums: dict[str, GradientStats] = {}

    def probe(name: str, g: torch.Tensor) -> None:
        acc = sums.get(name)
        if acc is None:
            acc = sums[name] = GradientStats(torch.zeros(g.shape[0], dtype=torch.float64, device=g.device),
                                             torch.zeros(g.shape[1], dtype=torch.float64, device=g.device))
        g2 = g.double().pow(2)
        acc.row_sq += g2.sum(1)
        acc.col_sq += g2.sum(0)

    with setup.timer.phase("gradients"):
        info = run_gradient_pass(setup, setup.windows_for_gradients(None), probe)
    note_gradient_pass(setup, "statistics", info)
    return {n: GradientStats(s.row_sq.cpu(), s.col_sq.cpu()) for n, s in sums.items()}


class GlobalPlanner:
    """Plans the selections of a global allocator (one or more stages)."""

    def __init__(self, setup: RunSetup, block_pass: BlockPass) -> None:
        self.setup = setup
        self.block_pass = block_pass
        #: The last stage's profiles, on the host, when the compression pass can truncate exactly
        #: the SVDs that were scored (``inputs: original``: the same weights and the same inputs).
        self.kept: dict[str, MatrixProfile] | None = None

    def plan(self, inputs: BlockInputs, undo: Undo) -> dict[str, Selection]:
        """Every stage of the allocator; returns the last stage's plan. Weights that a ``refine``
        changed are recorded in ``undo``; a matrix planned dense ends with its original weight
        unless the allocator says otherwise (``Allocator.restores_dense``)."""
        setup = self.setup
        context = EngineModelContext(setup.model, setup.targets, setup.calibration,
                                     self._gradient_data(setup.recipe.allocator), setup.device)
        with setup.timer.phase("planning"):
            allocator = setup.recipe.allocator.prepare(context)
        setup.report.notes.extend(context.notes)
        setup.keep_diagnostics(allocator.name, context.diagnostics)
        stages = max(1, int(allocator.stages))
        teacher: dict[str, torch.Tensor] = {}
        for stage in range(stages):
            last = stage == stages - 1
            plan, profiles = self._plan_stage(allocator, inputs, keep_profiles=not last,
                                              keep_last=last and setup.recipe.inputs == "original"
                                              and not setup.hooks.streams_blocks)
            if last:
                break
            if not teacher:
                teacher = self._teacher_weights(undo)
            refine = EngineRefineContext(setup.model, setup.targets, setup.calibration,
                                         self._gradient_data(allocator), setup.device,
                                         profiles=profiles, teacher=teacher, stage=stage, stages=stages)
            with model_on_device(setup), setup.timer.phase("refinement"):
                allocator.refine(refine, plan)
            setup.report.notes.extend(refine.notes)
            setup.keep_diagnostics(allocator.name, refine.diagnostics)
        if teacher:  # a matrix that ends up dense keeps its original weight, unless the allocator says not
            dense = [t for t in setup.targets if plan[t.name].stays_dense(t.shape)]
            if allocator.restores_dense:
                for t in dense:
                    context.set_weight(t.name, teacher[t.name])
            else:
                moved = sum(not torch.equal(context.weight(t.name).cpu(), teacher[t.name]) for t in dense)
                setup.report.notes.append(f"{allocator.name}: {moved} of {len(dense)} matrices stored dense keep "
                                          "the weights its refinements left them, not their original ones")
        return plan

    def _gradient_data(self, allocator: Allocator) -> torch.Tensor:
        return self.setup.windows_for_gradients(allocator.gradient_windows())

    def _teacher_weights(self, undo: Undo) -> dict[str, torch.Tensor]:
        teacher = {}
        for t in self.setup.targets:
            undo.save_weight(t.name)
            teacher[t.name] = weight_of(self.setup.model.get_submodule(t.name)).detach().to(
                "cpu", torch.float64, copy=True)
        return teacher

    def _plan_stage(self, allocator: Allocator, inputs: BlockInputs, keep_profiles: bool,
                    keep_last: bool = False) -> tuple[dict[str, Selection], dict[str, ScaledSVD]]:
        """Profile every block on the current weights, score, allocate."""
        setup = self.setup
        kept: dict[str, MatrixProfile] = {}
        spectra: dict[str, MatrixSpectrum] = {}
        scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        profiles: dict[str, ScaledSVD] = {}
        with setup.timer.phase("planning"):
            hidden = inputs.hidden
            for index in setup.bar("profiling"):
                setup.hooks.enter(index, "planning")
                with naming_block(index, len(setup.blocks)), on_device(setup.blocks[index], setup.device) as block:
                    collected = self.block_pass.collect(block, index, inputs, keep_outputs=True)
                    shared: dict[int, LayerStats] = {}   # per block: ids of freed tensors are reused
                    for p in self.block_pass.profile(block, index, inputs, collected, None):
                        spectra[p.target.name] = p.spectrum
                        scorer = allocator.component_scorer(p.spectrum, p.svd)
                        if scorer is not None:
                            scorers[p.target.name] = scorer
                        if keep_profiles:
                            profiles[p.target.name] = p.svd.to("cpu")
                        if keep_last:
                            kept[p.target.name] = p.kept_on_host(shared)
                    inputs.hidden = collected.outputs  # type: ignore[assignment]
                setup.hooks.leave(index, "planning", inputs)
            inputs.hidden = hidden
            if scorers:
                spectra = self._scored(allocator, spectra, scorers)
            selections = checked_allocation(setup, list(spectra.values()), allocator)
        if keep_last:
            self.kept = kept
        return selections, profiles

    def _scored(self, allocator: Allocator, spectra: dict[str, MatrixSpectrum],
                scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> dict[str, MatrixSpectrum]:
        """One gradient pass; each matrix's scores averaged over the batches."""
        setup = self.setup
        totals: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def probe(name: str, g: torch.Tensor) -> None:
            scores = scorers[name](g).detach().double().cpu()
            totals[name] = totals[name] + scores if name in totals else scores
            counts[name] = counts.get(name, 0) + 1

        with setup.timer.phase("gradients"):
            info = run_gradient_pass(setup, self._gradient_data(allocator), probe, lean=bool(allocator.lean_gradients))
        note_gradient_pass(setup, "scores", info)
        return {name: dataclasses.replace(s, scores=totals[name] / counts[name]) if name in totals else s
                for name, s in spectra.items()}

