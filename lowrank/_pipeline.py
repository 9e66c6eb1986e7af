"""``lowrank.compress``: walk the decoder blocks one at a time and factor every targeted layer.

Per block: run the calibration batches through it with hooks that accumulate each targeted
layer's input statistics (float32), take the scaled SVD of each weight (float64), let the
allocator choose the kept components, and swap the layer for a ``LowRankLinear`` (or keep it dense
when factoring would not save parameters). The next block's inputs are the compressed block's
outputs (``inputs="sequential"``) or the original block's (``inputs="original"``).

Global allocators need every matrix's spectrum first: the pipeline profiles the uncompressed model
(and, when the allocator scores components from gradients, runs one gradient pass), allocates,
and compresses in a second pass with the planned selections. A multi-stage allocator may change
the weights between planning stages (``Allocator.refine``).

On any error the model is restored to what it was.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Any

import torch
from torch import nn

from ._allocator import Budget, MatrixSpectrum, Selection
from ._capture import BlockContext, BlockInputs, capture_block_inputs, run_block
from ._diagnostics import effective_rank, participation_ratio
from ._errors import CompressionError
from ._evaluate import count_parameters
from ._factorize import ScaledSVD, activation_error, build_factors, scaled_svd_batch
from ._gradients import GradientPassInfo, gradient_pass, max_gpu_bytes, reset_gpu_peak
from ._guard import Undo, validate_inputs
from ._model import Target, find_blocks, find_targets, lowrank_from_linear, weight_of
from ._recipe import Recipe
from ._refine import ModelContext, RefineContext
from ._report import CompressionReport, MatrixReport
from ._scaling import LayerStats
from ._stats import StatsCollector

__all__ = ["compress", "resolve_device"]

_SPECTRUM_FIELDS = ("effective_rank_before", "effective_rank_after", "participation_ratio_before",
                    "participation_ratio_after")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_device(device: str) -> tuple[torch.device, list[str]]:
    """``auto`` picks CUDA when present; an unavailable CUDA falls back to the CPU (said in notes)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), []
    if device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu"), [f"device {device!r} requested but CUDA is not available; ran on cpu"]
    return torch.device(device), []


def _gradient_windows(calibration: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    """The calibration windows re-cut into ``shape`` = (windows, tokens) sequences (or as they are)."""
    if shape is None:
        return calibration
    n, length = shape
    flat = calibration.reshape(-1)
    n = max(1, min(n, flat.numel() // length)) if flat.numel() >= length else 1
    length = min(length, flat.numel())
    return flat[: n * length].reshape(n, length)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


class _Run:
    def __init__(self, model: nn.Module, recipe: Recipe, calibration: torch.Tensor, batch_size: int,
                 progress: bool, gradient_data: torch.Tensor | None) -> None:
        self.model, self.recipe, self.progress = model, recipe, progress
        self.device, notes = resolve_device(recipe.device)
        self.targets = find_targets(model, recipe.targets, recipe.ignore)
        validate_inputs(model, calibration)
        self.prefix, self.blocks = find_blocks(model)
        self.homes = [next(b.parameters()).device for b in self.blocks]
        self.batches = list(calibration.split(batch_size))
        self.calibration = calibration
        self.gradient_data = gradient_data
        needs = set().union(*(s.requires for s in recipe.scalings))
        self.want_abs, self.want_inputs, self.want_block = "abs_mean" in needs, "inputs" in needs, "block" in needs
        self.want_grad_stats = bool(needs & {"grad_row_sq", "grad_col_sq"})
        self.grad_stats: dict[str, dict[str, torch.Tensor]] = {}
        self.report = CompressionReport(recipe.name, recipe.ratio, device=str(self.device), notes=notes)
        # "forward" is one pass of the calibration set through the uncompressed blocks ("statistics"
        # is the time inside the hooks); "forward_next" is the extra pass through each compressed
        # block that sequential mode needs; "planning" is the profiling/gradient work of global
        # allocators.
        self.timings = {"capture": 0.0, "forward": 0.0, "statistics": 0.0, "factorization": 0.0,
                        "forward_next": 0.0, "planning": 0.0, "gradients": 0.0}
        self.by_block: dict[int, list[Target]] = {}
        for t in self.targets:
            self.by_block.setdefault(t.block, []).append(t)

    # -- helpers -------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _bar(self, what: str):
        from tqdm.auto import tqdm

        return tqdm(range(len(self.blocks)), desc=f"lowrank: {what}", unit="block",
                    disable=not self.progress, file=sys.stderr, leave=False)

    def _modules(self) -> dict[str, nn.Module]:
        return {t.name: self.model.get_submodule(t.name) for t in self.targets}

    def _gradient_data(self, shape: tuple[int, int] | None) -> torch.Tensor:
        if self.gradient_data is not None:
            return self.gradient_data
        limit = max_positions(self.model)
        if shape is not None and limit is not None and shape[1] > limit:  # e.g. GPT-2's 1024 positions
            shape = (shape[0] * -(-shape[1] // limit), limit)
        return _gradient_windows(self.calibration, shape)

    # -- one block -----------------------------------------------------------------------------

    def _collect(self, block: nn.Module, index: int, inputs: BlockInputs, keep_outputs: bool):
        collector = StatsCollector(want_abs_mean=self.want_abs, want_inputs=self.want_inputs)
        modules = {t.name: block.get_submodule(t.local) for t in self.by_block.get(index, [])}
        outputs: list[torch.Tensor] | None = [] if keep_outputs else None
        start = time.perf_counter()
        with torch.no_grad(), collector.attached(modules):
            for hidden in inputs.hidden:
                collector.next_batch()
                out = run_block(block, hidden, *inputs.args_for(index, hidden))
                if outputs is not None:
                    outputs.append(out)
        self._sync()
        self.timings["forward"] += time.perf_counter() - start - collector.seconds
        self.timings["statistics"] += collector.seconds
        return collector, outputs

    def _stats_for(self, t: Target, collector: StatsCollector, block: nn.Module, index: int,
                   inputs: BlockInputs, outputs: list[torch.Tensor] | None) -> LayerStats:
        stats = collector.stats(t.name)
        extras: dict[str, Any] = {}
        if t.name in self.grad_stats:
            extras.update({k: v.to(self.device, torch.float64) for k, v in self.grad_stats[t.name].items()})
        if self.want_block and outputs is not None:
            extras["block"] = BlockContext(block, t.local, inputs, index, outputs)
        # a per-matrix view that still shares the input's Gram matrix and cache
        return dataclasses.replace(stats, extras={**stats.extras, **extras}) if extras else stats

    def _profile(self, block: nn.Module, index: int, inputs: BlockInputs, collector: StatsCollector,
                 outputs: list[torch.Tensor] | None, plan: dict[str, Selection] | None):
        start = time.perf_counter()
        targets = self.by_block.get(index, [])
        ws = [weight_of(block.get_submodule(t.local)).detach().to(self.device, torch.float64) for t in targets]
        stats = [self._stats_for(t, collector, block, index, inputs, outputs) for t in targets]
        ranks = [plan[t.name].rank if plan is not None else self.recipe.allocator.rank_hint(t.shape, self.recipe.ratio)
                 for t in targets]
        svds = scaled_svd_batch(ws, stats, self.recipe.scalings, ranks)
        out = {t.name: (svd, st, w, MatrixSpectrum(t.name, t.shape, svd.s, None, index))
               for t, svd, st, w in zip(targets, svds, stats, ws)}
        self._sync()
        self.timings["factorization"] += time.perf_counter() - start
        return out

    def _apply(self, block: nn.Module, index: int, profiles: dict, selections: dict[str, Selection], undo: Undo) -> list[MatrixReport]:
        reports = []
        for t in self.by_block.get(index, []):
            start = time.perf_counter()
            svd, stats, w, spectrum = profiles[t.name]
            sel = selections[t.name]
            m, n = t.shape
            module = block.get_submodule(t.local)
            if sel.is_dense or sel.params(t.shape) >= m * n:
                rank, after, s_err, a_err = None, m * n, 0.0, 0.0
            else:
                a, b = build_factors(svd, sel)
                s_err = svd.spectrum_error(sel)
                a_err = activation_error(w, a @ b, stats.covariance)
                dtype = weight_of(module).dtype if self.recipe.dtype == "auto" else _DTYPES[self.recipe.dtype]
                undo.swap(f"{self.prefix}.{index}.{t.local}", lowrank_from_linear(module, a, b, dtype))
                rank, after = sel.rank, sel.params(t.shape)
            report = MatrixReport(t.name, index, t.shape, rank, m * n, after, s_err, a_err,
                                  effective_rank(svd.s), list(svd.notes), participation_ratio(svd.s),
                                  diagnostics=dict(svd.diagnostics))
            for key, value in svd.diagnostics.items():  # a scaling's before/after spectrum measures
                field_name = key.rsplit(".", 1)[-1]
                if field_name in _SPECTRUM_FIELDS:
                    setattr(report, field_name, value)
            reports.append(report)
            self._sync()
            self.timings["factorization"] += time.perf_counter() - start
        return reports

    def _allocate(self, spectra: list[MatrixSpectrum]) -> dict[str, Selection]:
        allocator = self.recipe.allocator
        selections = allocator.allocate(spectra, Budget(self.recipe.ratio, sum(s.dense_params for s in spectra)))
        if len(selections) != len(spectra):
            raise CompressionError(f"allocator {allocator.name!r} returned {len(selections)} selections for {len(spectra)} matrices")
        for spec, sel in zip(spectra, selections):
            if sel.indices is not None and any(not 0 <= i < spec.full_rank for i in sel.indices):
                raise CompressionError(f"allocator {allocator.name!r} selected components outside [0, {spec.full_rank}) for {spec.name}")
        return {s.name: sel for s, sel in zip(spectra, selections)}

    # -- passes --------------------------------------------------------------------------------

    def gradient_statistics(self) -> None:
        """Squared calibration-loss gradients per row and column, for scalings that ask (FWSVD)."""
        start = time.perf_counter()
        sums: dict[str, dict[str, torch.Tensor]] = {}

        def probe(name: str, g: torch.Tensor) -> None:
            acc = sums.setdefault(name, {"grad_row_sq": torch.zeros(g.shape[0], dtype=torch.float64, device=g.device),
                                         "grad_col_sq": torch.zeros(g.shape[1], dtype=torch.float64, device=g.device)})
            g2 = g.double().pow(2)
            acc["grad_row_sq"] += g2.sum(1)
            acc["grad_col_sq"] += g2.sum(0)

        info = gradient_pass(self.model, self._gradient_data(None), self._modules(), probe)
        self._note_gradient_pass("statistics", info)
        self.grad_stats = {n: {k: v.cpu() for k, v in d.items()} for n, d in sums.items()}
        self.timings["gradients"] += time.perf_counter() - start

    def plan(self, inputs: BlockInputs, keep_profiles: bool) -> tuple[dict[str, Selection], dict[str, ScaledSVD]]:
        """Profiling pass for global allocators over the current (uncompressed) weights."""
        start = time.perf_counter()
        allocator = self.recipe.allocator
        spectra: dict[str, MatrixSpectrum] = {}
        scorers: dict[str, Any] = {}
        profiles: dict[str, ScaledSVD] = {}
        hidden = inputs.hidden
        for index in self._bar("profiling"):
            block, home = self._on_device(index)
            collector, outputs = self._collect(block, index, inputs, keep_outputs=True)
            for name, (svd, _stats, _w, spectrum) in self._profile(block, index, inputs, collector, outputs, None).items():
                spectra[name] = spectrum
                scorer = allocator.component_scorer(spectrum, svd)
                if scorer is not None:
                    scorers[name] = scorer
                if keep_profiles:
                    profiles[name] = svd.to("cpu")
            inputs.hidden = outputs  # type: ignore[assignment]
            block.to(home)
        inputs.hidden = hidden
        if scorers:
            g0 = time.perf_counter()
            totals: dict[str, torch.Tensor] = {}
            counts: dict[str, int] = {}

            def probe(name: str, g: torch.Tensor) -> None:
                scores = scorers[name](g).detach().double().cpu()
                totals[name] = totals[name] + scores if name in totals else scores
                counts[name] = counts.get(name, 0) + 1

            on_device = self._model_on_device()
            try:
                info = gradient_pass(self.model, self._gradient_data(allocator.gradient_windows()), self._modules(), probe,
                                     lean=bool(allocator.lean_gradients))
            finally:
                on_device()
            self._note_gradient_pass("scores", info)
            for name, total in totals.items():
                spectra[name] = dataclasses.replace(spectra[name], scores=total / counts[name])
            self.timings["gradients"] += time.perf_counter() - g0
        selections = self._allocate(list(spectra.values()))
        self.timings["planning"] += time.perf_counter() - start
        return selections, profiles

    def _note_gradient_pass(self, what: str, info: GradientPassInfo) -> None:
        peak = f", peak GPU {info.peak_gpu_bytes / 2**20:.0f} MiB" if info.peak_gpu_bytes else ""
        self.report.notes.append(f"gradient pass ({what}, {'lean' if info.lean else 'plain'}): {info.batches} "
                                 f"batch(es), {info.tokens} tokens, loss {info.loss:.4f}{peak}")

    def _model_on_device(self):
        """Move the whole model to the device for a gradient pass; returns the undo."""
        home = next(self.model.parameters()).device
        if home == self.device:
            return lambda: None
        self.model.to(self.device)
        return lambda: self.model.to(home)

    def _on_device(self, index: int):
        block = self.blocks[index]
        home = next(block.parameters()).device
        block.to(self.device)
        return block, home

    def compress(self, inputs: BlockInputs, plan: dict[str, Selection] | None, undo: Undo) -> None:
        n_blocks = len(self.blocks)
        original = self.recipe.inputs == "original"
        for index in self._bar("compressing"):
            start = time.perf_counter()
            block, home = self._on_device(index)
            collector, outputs = self._collect(block, index, inputs, keep_outputs=original or self.want_block)
            profiles = self._profile(block, index, inputs, collector, outputs, plan)
            del collector
            if plan is not None:
                selections = {name: plan[name] for name in profiles}
            else:
                selections = self._allocate([v[3] for v in profiles.values()])
            reports = self._apply(block, index, profiles, selections, undo)
            del profiles
            self.report.matrices.extend(reports)
            inputs.hidden = outputs if original else self._forward_next(block, index, inputs)  # type: ignore[assignment]
            block.to(home)
            if self.progress and reports:
                self._log_block(index, n_blocks, reports, time.perf_counter() - start)

    def _forward_next(self, block: nn.Module, index: int, inputs: BlockInputs) -> list[torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            out = [run_block(block, h, *inputs.args_for(index, h)) for h in inputs.hidden]
        self._sync()
        self.timings["forward_next"] += time.perf_counter() - start
        return out

    def _log_block(self, index: int, n: int, reports: list[MatrixReport], seconds: float) -> None:
        from tqdm.auto import tqdm

        ranks = " ".join(f"{r.name.rsplit('.', 1)[-1]}={'dense' if r.rank is None else r.rank}" for r in reports)
        err = sum(r.activation_error for r in reports) / len(reports)
        tqdm.write(f"block {index + 1}/{n}: {ranks} | mean rel. activation error {err:.4f} | {seconds:.1f}s", file=sys.stderr)

    def run(self, undo: Undo) -> None:
        t0 = time.perf_counter()
        inputs = capture_block_inputs(self.model, self.blocks, self.batches, self.device)
        self.timings["capture"] += time.perf_counter() - t0
        if self.want_grad_stats:
            on_device = self._model_on_device()
            try:
                self.gradient_statistics()
            finally:
                on_device()
        allocator = self.recipe.allocator
        plan = None
        if allocator.scope == "global":
            context = ModelContext(self.model, self.targets, self.calibration,
                                   self._gradient_data(allocator.gradient_windows()), self.device)
            p0 = time.perf_counter()
            allocator.prepare(context)
            self.timings["planning"] += time.perf_counter() - p0
            self.report.notes.extend(context.notes)
            stages = max(1, int(allocator.stages))
            teacher: dict[str, torch.Tensor] = {}
            for stage in range(stages):
                last = stage == stages - 1
                plan, profiles = self.plan(inputs, keep_profiles=not last)
                if last:
                    break
                if not teacher:
                    for t in self.targets:
                        undo.save_weight(t.name)
                        teacher[t.name] = weight_of(self.model.get_submodule(t.name)).detach().to("cpu", torch.float64, copy=True)
                context = RefineContext(self.model, self.targets, self.calibration,
                                        self._gradient_data(allocator.gradient_windows()), self.device,
                                        profiles=profiles, teacher=teacher, stage=stage, stages=stages)
                on_device = self._model_on_device()
                try:
                    allocator.refine(context, plan)
                finally:
                    on_device()
                self.report.notes.extend(context.notes)
            if teacher:  # a matrix that ends up dense keeps its original weight
                for t in self.targets:
                    if plan[t.name].is_dense or plan[t.name].params(t.shape) >= t.shape[0] * t.shape[1]:
                        context.set_weight(t.name, teacher[t.name])
        self.compress(inputs, plan, undo)


def compress(model: nn.Module, recipe: Recipe | None = None, calibration: torch.Tensor | None = None, *,
             batch_size: int = 8, progress: bool = True, gradient_data: torch.Tensor | None = None) -> CompressionReport:
    """Compress ``model`` in place with ``recipe`` and return the report.

    Args:
        model: a Hugging Face causal LM built from ``nn.Linear`` (or GPT-2's ``Conv1D``).
        recipe: what to do; the default is whitening + uniform ranks at ratio 0.2.
        calibration: token ids, a (windows x tokens) integer tensor.
        batch_size: windows per forward pass.
        progress: show a bar over blocks and a line per block.
        gradient_data: token windows for the calibration-loss gradients that some strategies use
            (default: the calibration windows, re-cut to the length the strategy asks for).

    The model is left unchanged when anything fails. The report is also stored as
    ``model.lowrank_report`` and the recipe as ``model.lowrank_recipe`` (the exporters read them).
    """
    recipe = recipe if recipe is not None else Recipe()
    if calibration is None:
        raise CompressionError("calibration: expected token ids (windows x tokens); see lowrank.calibration_windows")
    if not isinstance(recipe, Recipe):
        raise CompressionError(f"recipe: expected a lowrank.Recipe, got {type(recipe).__name__}")
    if batch_size < 1:
        raise CompressionError(f"batch_size: expected a positive integer, got {batch_size}")
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    run = _Run(model, recipe, calibration, batch_size, progress, gradient_data)
    run.report.model_params_before = count_parameters(model)
    undo = Undo(model)
    reset_gpu_peak(run.device)
    try:
        run.run(undo)
    except BaseException:
        for block, home in zip(run.blocks, run.homes):  # a failure can strike while a block is on the GPU
            block.to(home)
        undo.rollback()
        model.train(was_training)
        raise
    model.train(was_training)
    report = run.report
    report.model_params_after = count_parameters(model)
    report.timings = {k: v for k, v in {**run.timings, "total": time.perf_counter() - started}.items() if v or k == "total"}
    report.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if run.device.type == "cuda":
        report.notes.append(f"peak GPU memory {max_gpu_bytes(run.device) / 2**20:.0f} MiB")
    report.notes.extend(sorted({n for m in report.matrices for n in m.notes}))
    model.lowrank_report = report  # type: ignore[assignment]
    model.lowrank_recipe = recipe  # type: ignore[assignment]
    return report
