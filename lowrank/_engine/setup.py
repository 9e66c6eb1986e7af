"""What every pass of one compression shares: the model's blocks and targets, the device, the clock."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .._contract.errors import CompressionError
from .._contract.model import Target, max_positions
from .._contract.recipe import Recipe
from .._contract.report import CompressionReport
from .device import PhaseTimer, resolve_device
from .discovery import find_blocks, find_targets
from .guard import check_weights, validate_inputs
from .hooks import BlockHooks
from .offload import HiddenStore, MemoryStore

__all__ = ["naming_block", "StatisticsNeeds", "GradientStats", "RunSetup", "on_device", "model_on_device", "recut_windows",
           "preflight"]


@dataclass(frozen=True)
class StatisticsNeeds:
    """Which optional statistics the recipe asks for (``Scaling.requires``, its target, its corrections).

    Attributes:
        reference: Carry the uncompressed model's hidden states beside the compressed ones
            (sequential inputs with a compensated target or a correction that ``needs_reference``).
        cross: Accumulate the cross-covariance of original and compressed inputs (compensated target).
    """

    abs_mean: bool = False
    inputs: bool = False
    block: bool = False
    gradients: bool = False
    reference: bool = False
    cross: bool = False

    @classmethod
    def of(cls, recipe: Recipe) -> "StatisticsNeeds":
        """The union of every scaling's ``requires``, and the reference stream when it is needed."""
        needs = set().union(*(s.requires for s in recipe.scalings))
        sequential = recipe.inputs == "sequential"
        cross = sequential and recipe.target == "compensated"
        reference = cross or (sequential and any(c.needs_reference for c in recipe.corrections))
        return cls("abs_mean" in needs, "inputs" in needs, "block" in needs,
                   bool(needs & {"grad_row_sq", "grad_col_sq"}), reference, cross)


@dataclass
class GradientStats:
    """Squared calibration-loss gradients of one weight, summed over batches per row and column."""

    row_sq: torch.Tensor
    col_sq: torch.Tensor


@dataclass
class RunSetup:
    """One compression's fixed facts, found once (the blocks are searched for a single time)."""

    model: nn.Module
    recipe: Recipe
    calibration: torch.Tensor
    batch_size: int
    progress: bool
    device: torch.device
    prefix: str
    blocks: nn.ModuleList
    targets: list[Target]
    needs: StatisticsNeeds
    timer: PhaseTimer
    report: CompressionReport
    gradient_data: torch.Tensor | None = None
    gradient_stats: dict[str, GradientStats] = field(default_factory=dict)
    hooks: BlockHooks = field(default_factory=BlockHooks)  # streamed / resumable runs: _engine/stream.py
    store: HiddenStore = field(default_factory=MemoryStore)  # where hidden states wait: _engine/offload.py
    #: every process's calibration windows in a multi-process run (``calibration`` is this
    #: process's share); gradient passes read them all, so that every process scores alike
    all_calibration: torch.Tensor | None = None
    #: per matrix, what the allocator reported about it (``ModelContext.diagnostics``, keys prefixed)
    matrix_diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)

    def keep_diagnostics(self, allocator: str, context_diagnostics: dict[str, dict[str, float]]) -> None:
        """Merge an allocator's per-matrix numbers, each key as ``<allocator>.<key>``."""
        for name, values in context_diagnostics.items():
            self.matrix_diagnostics.setdefault(name, {}).update({f"{allocator}.{k}": float(v) for k, v in values.items()})

    @classmethod
    def create(cls, model: nn.Module, recipe: Recipe, calibration: torch.Tensor, batch_size: int,
               progress: bool, gradient_data: torch.Tensor | None) -> "RunSetup":
        """Validate the inputs and find the blocks and targets (before anything changes)."""
        device, notes, prefix, blocks, targets = _checked(model, recipe, calibration)
        report = CompressionReport(recipe.name, recipe.ratio, device=str(device), notes=list(notes))
        return cls(model, recipe, calibration, batch_size, progress, device, prefix, blocks, targets,
                   StatisticsNeeds.of(recipe), PhaseTimer(device), report, gradient_data)

    def targets_of(self, index: int) -> list[Target]:
        """The targeted layers of block ``index``, in model order."""
        return [t for t in self.targets if t.block == index]

    def batches(self) -> list[torch.Tensor]:
        """The calibration windows cut into batches."""
        return list(self.calibration.split(self.batch_size))

    def modules(self) -> dict[str, nn.Module]:
        """Every targeted module by full name."""
        return {t.name: self.model.get_submodule(t.name) for t in self.targets}

    def windows_for_gradients(self, shape: tuple[int, int] | None) -> torch.Tensor:
        """The windows of a gradient pass: ``gradient_data`` when given, else the calibration
        windows (every process's, in a multi-process run) re-cut to ``shape`` = (windows, tokens)
        within the model's positions."""
        if self.gradient_data is not None:
            return self.gradient_data
        limit = max_positions(self.model)
        if shape is not None and limit is not None and shape[1] > limit:  # e.g. GPT-2's 1024 positions
            shape = (shape[0] * -(-shape[1] // limit), limit)
        return recut_windows(self.all_calibration if self.all_calibration is not None else self.calibration, shape)

    def bar(self, what: str):
        """A progress bar over the blocks (on stderr; silent without ``progress``)."""
        from tqdm.auto import tqdm

        return tqdm(range(len(self.blocks)), desc=f"lowrank: {what}", unit="block",
                    disable=not self.progress, file=sys.stderr, leave=False)


def preflight(model: nn.Module, recipe: Recipe | None = None, calibration: torch.Tensor | None = None) -> list[Target]:
    """Every check :func:`lowrank.compress` makes before its first forward pass, changing nothing.

    The recipe's device exists; the model has decoder blocks lowrank recognises (else an
    "unsupported architecture" error naming what was looked for); the recipe's ``targets`` /
    ``ignore`` match at least one linear layer; no weight is NaN or infinite; and, when
    ``calibration`` is given, it is token ids within the vocabulary, in windows no longer than the
    model's context. Run it before anything slow (the CLI runs it before "perplexity before").

    Returns:
        The targeted layers, in model order.

    Raises:
        lowrank.DeviceError, lowrank.CompressionError: as :func:`lowrank.compress` would.
    """
    recipe = recipe if recipe is not None else Recipe()
    if not isinstance(recipe, Recipe):
        raise CompressionError(f"recipe: expected a lowrank.Recipe, got {type(recipe).__name__}")
    return _checked(model, recipe, calibration)[4]


def _checked(model: nn.Module, recipe: Recipe, calibration: torch.Tensor | None):
    """The checks shared by :func:`preflight` and :meth:`RunSetup.create`, and what they found:
    (device, notes, blocks' prefix, blocks, targets)."""
    device, notes = resolve_device(recipe.device)
    prefix, blocks = find_blocks(model)
    targets = find_targets(model, recipe.targets, recipe.ignore, blocks=(prefix, blocks))
    if calibration is not None:
        validate_inputs(model, calibration)
    else:
        check_weights(model)
    return device, notes, prefix, blocks, targets


def recut_windows(calibration: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    """The calibration windows re-cut into ``shape`` = (windows, tokens) sequences (or as they are)."""
    if shape is None:
        return calibration
    n, length = shape
    flat = calibration.reshape(-1)
    n = max(1, min(n, flat.numel() // length)) if flat.numel() >= length else 1
    length = min(length, flat.numel())
    return flat[: n * length].reshape(n, length)


@contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``module`` moved to ``device`` for the ``with`` body, then back where it was."""
    home = next(module.parameters()).device
    if home != device:
        module.to(device)
    try:
        yield module
    finally:
        if home != device:
            module.to(home)


def model_on_device(setup: RunSetup):
    """The whole model on the compute device (for a gradient pass), then back."""
    return on_device(setup.model, setup.device)


@contextmanager
def naming_block(index: int, count: int) -> Iterator[None]:
    """An out-of-memory error says which block ran out and what to try (the model is restored by
    the caller, as for any failure)."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise torch.OutOfMemoryError(
            f"out of memory in block {index + 1} of {count}: {str(err).splitlines()[0] if str(err) else ''} "
            "Try a smaller batch_size, inputs: original (no second pass per block), or device cpu."
        ) from err
