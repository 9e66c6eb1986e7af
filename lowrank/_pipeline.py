"""``lowrank.compress``: walk the decoder blocks one at a time and factor every targeted layer.

Per block: run the calibration batches through it with hooks that accumulate each targeted
layer's input statistics (float32), take the scaled SVD of each weight (float64), let the
allocator choose the kept components, and swap the layer for a ``LowRankLinear`` (or keep it dense
when factoring would not save parameters). The next block's inputs are the compressed block's
outputs (``inputs="sequential"``) or the original block's (``inputs="original"``).

Global allocators need every matrix's spectrum first: the pipeline then profiles the uncompressed
model in a first pass, allocates, and compresses in a second pass with the planned selections.

On any error the model is restored to what it was: every swapped layer is put back.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Sequence

import torch
from torch import nn

from ._allocator import Budget, MatrixSpectrum, Selection
from ._capture import BlockInputs, capture_block_inputs, run_block
from ._errors import CompressionError
from ._factorize import activation_error, build_factors, scaled_svd
from ._model import Target, find_blocks, find_targets, lowrank_from_linear, set_submodule, weight_of
from ._recipe import Recipe
from ._report import CompressionReport, MatrixReport
from ._stats import StatsCollector

__all__ = ["compress", "resolve_device", "count_parameters", "effective_rank"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_device(device: str) -> tuple[torch.device, list[str]]:
    """``auto`` picks CUDA when present; an unavailable CUDA falls back to the CPU (said in notes)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), []
    if device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu"), [f"device {device!r} requested but CUDA is not available; ran on cpu"]
    return torch.device(device), []


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank exp(-sum p log p), p = sigma / sum sigma."""
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _validate(model: nn.Module, calibration: torch.Tensor, targets: list[Target]) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        raise CompressionError(
            "calibration: expected a 2-D integer tensor of token ids (windows x tokens), got "
            f"{type(calibration).__name__}{tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else ''}"
        )
    if calibration.shape[0] < 1 or calibration.shape[1] < 2:
        raise CompressionError(
            f"calibration: expected at least one window of at least 2 tokens, got shape {tuple(calibration.shape)}"
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(calibration.min()) < 0 or int(calibration.max()) >= vocab:
        raise CompressionError(f"calibration: token ids must lie in [0, {vocab}), got [{int(calibration.min())}, {int(calibration.max())}]")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CompressionError(f"the model has non-finite (NaN or inf) weights in {name}; nothing was changed")


class _Undo:
    """Records swapped layers so a failure puts the original ones back."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.log = model, []

    def swap(self, name: str, module: nn.Module) -> None:
        self.log.append((name, set_submodule(self.model, name, module)))

    def rollback(self) -> None:
        for name, old in reversed(self.log):
            set_submodule(self.model, name, old)
        self.log.clear()


class _Run:
    def __init__(self, model: nn.Module, recipe: Recipe, calibration: torch.Tensor, batch_size: int,
                 progress: bool) -> None:
        self.model, self.recipe, self.progress = model, recipe, progress
        self.device, notes = resolve_device(recipe.device)
        self.targets = find_targets(model, recipe.targets, recipe.ignore)
        _validate(model, calibration, self.targets)
        self.prefix, self.blocks = find_blocks(model)
        self.batches = list(calibration.split(batch_size))
        self.want_abs = any("abs_mean" in s.requires for s in recipe.scalings)
        self.report = CompressionReport(recipe.name, recipe.ratio, device=str(self.device), notes=notes)
        self.timings = {"capture": 0.0, "forward": 0.0, "statistics": 0.0, "factorization": 0.0}
        self.by_block: dict[int, list[Target]] = {}
        for t in self.targets:
            self.by_block.setdefault(t.block, []).append(t)

    # -- one block -----------------------------------------------------------------------------

    def _collect(self, block: nn.Module, index: int, inputs: BlockInputs, keep_outputs: bool) -> tuple[StatsCollector, list[torch.Tensor] | None]:
        collector = StatsCollector(want_abs_mean=self.want_abs)
        modules = {t.name: block.get_submodule(t.local) for t in self.by_block.get(index, [])}
        outputs: list[torch.Tensor] | None = [] if keep_outputs else None
        start = time.perf_counter()
        with torch.no_grad(), collector.attached(modules):
            for hidden in inputs.hidden:
                args, kwargs = inputs.args_for(index, hidden)
                out = run_block(block, hidden, args, kwargs)
                if outputs is not None:
                    outputs.append(out)
        self._sync()
        self.timings["forward"] += time.perf_counter() - start - collector.seconds
        self.timings["statistics"] += collector.seconds
        return collector, outputs

    def _forward(self, block: nn.Module, index: int, inputs: BlockInputs) -> list[torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            out = [run_block(block, h, *inputs.args_for(index, h)) for h in inputs.hidden]
        self._sync()
        self.timings["forward"] += time.perf_counter() - start
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _spectra(self, block: nn.Module, index: int, collector: StatsCollector,
                 plan: dict[str, Selection] | None) -> dict[str, tuple[Any, Any, torch.Tensor, MatrixSpectrum]]:
        out = {}
        for t in self.by_block.get(index, []):
            start = time.perf_counter()
            module = block.get_submodule(t.local)
            w = weight_of(module).detach().to(self.device, torch.float64)
            stats = collector.stats(t.name)
            if plan is not None:
                rank = plan[t.name].rank
            else:
                rank = self.recipe.allocator.rank_hint(t.shape, self.recipe.ratio)
            svd = scaled_svd(w, stats, self.recipe.scalings, rank=rank)
            spectrum = MatrixSpectrum(t.name, t.shape, svd.s, None, index)
            out[t.name] = (svd, stats, w, spectrum)
            self._sync()
            self.timings["factorization"] += time.perf_counter() - start
        return out

    def _apply(self, block: nn.Module, index: int, spectra: dict, selections: dict[str, Selection], undo: _Undo) -> list[MatrixReport]:
        reports = []
        for t in self.by_block.get(index, []):
            start = time.perf_counter()
            svd, stats, w, spectrum = spectra[t.name]
            sel = selections[t.name]
            m, n = t.shape
            module = block.get_submodule(t.local)
            dense = sel.is_dense or sel.params(t.shape) >= m * n
            cov = stats.covariance
            if dense:
                rank, after, s_err, a_err = None, m * n, 0.0, 0.0
            else:
                a, b = build_factors(svd, sel)
                s_err = svd.spectrum_error(sel)
                a_err = activation_error(w, a @ b, cov)
                dtype = weight_of(module).dtype if self.recipe.dtype == "auto" else _DTYPES[self.recipe.dtype]
                new = lowrank_from_linear(module, a, b, dtype)
                undo.swap(f"{self.prefix}.{index}.{t.local}", new)
                rank, after = sel.rank, sel.params(t.shape)
            reports.append(MatrixReport(t.name, index, t.shape, rank, m * n, after, s_err, a_err,
                                        effective_rank(svd.s), list(svd.notes)))
            self._sync()
            self.timings["factorization"] += time.perf_counter() - start
        return reports

    def _allocate(self, spectra: Sequence[MatrixSpectrum]) -> dict[str, Selection]:
        budget = Budget(self.recipe.ratio, sum(s.dense_params for s in spectra))
        selections = self.recipe.allocator.allocate(list(spectra), budget)
        if len(selections) != len(spectra):
            raise CompressionError(f"allocator {self.recipe.allocator.name!r} returned {len(selections)} selections for {len(spectra)} matrices")
        for spec, sel in zip(spectra, selections):
            if sel.indices is not None and any(not 0 <= i < spec.full_rank for i in sel.indices):
                raise CompressionError(f"allocator {self.recipe.allocator.name!r} selected components outside [0, {spec.full_rank}) for {spec.name}")
        return {s.name: sel for s, sel in zip(spectra, selections)}

    # -- passes --------------------------------------------------------------------------------

    def _blocks_on_device(self, index: int):
        block = self.blocks[index]
        home = next(block.parameters()).device
        block.to(self.device)
        return block, home

    def plan(self, inputs: BlockInputs) -> dict[str, Selection]:
        """Profiling pass for global allocators: every spectrum of the uncompressed model."""
        spectra: list[MatrixSpectrum] = []
        for index in self._bar("profiling"):
            block, home = self._blocks_on_device(index)
            collector, outputs = self._collect(block, index, inputs, keep_outputs=True)
            for name, (_svd, _s, _w, spectrum) in self._spectra(block, index, collector, None).items():
                spectra.append(spectrum)
            inputs.hidden = outputs  # type: ignore[assignment]
            block.to(home)
        return self._allocate(spectra)

    def compress(self, inputs: BlockInputs, plan: dict[str, Selection] | None, undo: _Undo) -> None:
        n_blocks = len(self.blocks)
        for index in self._bar("compressing"):
            start = time.perf_counter()
            block, home = self._blocks_on_device(index)
            original = self.recipe.inputs == "original"
            collector, outputs = self._collect(block, index, inputs, keep_outputs=original)
            spectra = self._spectra(block, index, collector, plan)
            del collector
            if plan is not None:
                selections = {name: plan[name] for name in spectra}
            else:
                selections = self._allocate([v[3] for v in spectra.values()])
            reports = self._apply(block, index, spectra, selections, undo)
            del spectra
            self.report.matrices.extend(reports)
            inputs.hidden = outputs if original else self._forward(block, index, inputs)  # type: ignore[assignment]
            block.to(home)
            if self.progress and reports:
                self._log_block(index, n_blocks, reports, time.perf_counter() - start)

    def _bar(self, what: str):
        from tqdm.auto import tqdm

        return tqdm(range(len(self.blocks)), desc=f"lowrank: {what}", unit="block",
                    disable=not self.progress, file=sys.stderr, leave=False)

    def _log_block(self, index: int, n: int, reports: list[MatrixReport], seconds: float) -> None:
        from tqdm.auto import tqdm

        ranks = " ".join(f"{r.name.rsplit('.', 1)[-1]}={'dense' if r.rank is None else r.rank}" for r in reports)
        err = sum(r.activation_error for r in reports) / len(reports)
        tqdm.write(f"block {index + 1}/{n}: {ranks} | mean rel. activation error {err:.4f} | {seconds:.1f}s", file=sys.stderr)


def compress(model: nn.Module, recipe: Recipe | None = None, calibration: torch.Tensor | None = None, *,
             batch_size: int = 8, progress: bool = True) -> CompressionReport:
    """Compress ``model`` in place with ``recipe`` and return the report.

    Args:
        model: a Hugging Face causal LM built from ``nn.Linear`` (or GPT-2's ``Conv1D``).
        recipe: what to do; the default is whitening + uniform ranks at ratio 0.2.
        calibration: token ids, a (windows x tokens) integer tensor.
        batch_size: windows per forward pass.
        progress: show a bar over blocks and a line per block.

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
    run = _Run(model, recipe, calibration, batch_size, progress)
    run.report.model_params_before = count_parameters(model)
    undo = _Undo(model)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    try:
        t0 = time.perf_counter()
        inputs = capture_block_inputs(model, run.blocks, run.batches, run.device)
        run.timings["capture"] += time.perf_counter() - t0
        plan = None
        if recipe.allocator.scope == "global":
            first_hidden = list(inputs.hidden)
            plan = run.plan(inputs)
            inputs.hidden = first_hidden
        run.compress(inputs, plan, undo)
    except BaseException:
        undo.rollback()
        model.train(was_training)
        raise
    model.train(was_training)
    report = run.report
    report.model_params_after = count_parameters(model)
    report.timings = {**run.timings, "total": time.perf_counter() - started}
    report.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if run.device.type == "cuda":
        report.notes.append(f"peak GPU memory {torch.cuda.max_memory_allocated(run.device) / 2**20:.0f} MiB")
    fallbacks = sorted({n for m in report.matrices for n in m.notes})
    report.notes.extend(fallbacks)
    model.lowrank_report = report  # type: ignore[assignment]
    model.lowrank_recipe = recipe  # type: ignore[assignment]
    return report
