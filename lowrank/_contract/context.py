"""What a global allocator sees of the model: before planning, and between two planning stages.

The engine hands an allocator a :class:`ModelContext` in ``Allocator.prepare`` and a
:class:`RefineContext` in ``Allocator.refine``. Both are abstract here: the engine supplies the
two methods that run the model (:meth:`ModelContext.gradient_pass`, :meth:`ModelContext.loss`),
so a plugin is typed against this module alone and never imports the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .factors import ScaledSVD, build_factors
from .model import Target, set_weight_of, weight_of
from .spectrum import Selection

__all__ = ["ModelContext", "RefineContext", "GradientPassInfo", "Probe"]

#: Receives (module name, gradient of its weight as out x in, float32) during a gradient pass.
Probe = Callable[[str, torch.Tensor], None]


@dataclass
class GradientPassInfo:
    """What one gradient pass did.

    Attributes:
        batches: Forward/backward passes run.
        tokens: Predicted tokens.
        seconds: Wall time.
        loss: Mean next-token cross-entropy over the batches.
        peak_gpu_bytes: Peak GPU memory during this pass alone (CUDA only).
        lean: Whether gradients were consumed inside hooks and dropped at once.
    """

    batches: int
    tokens: int
    seconds: float
    loss: float
    peak_gpu_bytes: int = 0
    lean: bool = True


@dataclass
class ModelContext(ABC):
    """The model as a global allocator may see it in ``Allocator.prepare`` (before any planning).

    Whatever the allocator changes it must change back; notes it appends end up in the report.

    Attributes:
        model: The model, uncompressed.
        targets: The targeted layers.
        calibration: The calibration windows (never evaluation text), windows x tokens.
        gradient_data: The windows for calibration-loss gradients.
        device: Where work should run.
        notes: Lines for the report.
        diagnostics: Per targeted matrix, numbers for its row of the report
            (``MatrixReport.diagnostics``; the engine prefixes each key with the allocator's name).
    """

    model: nn.Module
    targets: list[Target]
    calibration: torch.Tensor
    gradient_data: torch.Tensor
    device: torch.device
    notes: list[str] = field(default_factory=list)
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)

    def module(self, name: str) -> nn.Module:
        """The targeted module called ``name``."""
        return self.model.get_submodule(name)

    def weight(self, name: str) -> torch.Tensor:
        """The current weight as out x in (a float64 copy)."""
        return weight_of(self.module(name)).detach().to(torch.float64).clone()

    def set_weight(self, name: str, w: torch.Tensor) -> None:
        """Overwrite the weight (out x in) of a targeted layer."""
        set_weight_of(self.module(name), w)

    @abstractmethod
    def gradient_pass(self, probe: Probe, windows: torch.Tensor | None = None, lean: bool = True) -> GradientPassInfo:
        """Run forward/backward passes of the calibration loss on ``windows`` (default
        ``gradient_data``) and call ``probe(name, grad)`` for every targeted layer and batch."""

    @abstractmethod
    def loss(self, windows: torch.Tensor | None = None, batch_size: int = 8) -> float:
        """Mean next-token cross-entropy of the model on ``windows`` (default: the calibration set)."""


@dataclass
class RefineContext(ModelContext):
    """Between two planning stages: the profiles of the stage that just ran and the teacher weights.

    Attributes:
        profiles: The scaled SVD of every targeted matrix, from the stage that just ran.
        teacher: The original weights, out x in, on the CPU.
        stage: Index of the stage that just ran.
        stages: Number of stages.
    """

    profiles: dict[str, ScaledSVD] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    stage: int = 0
    stages: int = 1

    def truncation(self, name: str, selection: Selection) -> torch.Tensor:
        """The dense weight that keeping ``selection`` of this stage's scaled SVD gives (float64)."""
        a, b = build_factors(self.profiles[name], selection)
        return (a @ b).to(torch.float64)
