"""What a multi-stage global allocator may do between its stages (e.g. ZS-SVD's correction).

Between two planning passes the pipeline hands the allocator a ``RefineContext``: the model with
its current weights, the profiles (scaled SVDs) of the pass that just ran, the original (teacher)
weights, and a way to take calibration-loss gradients. The allocator may change targeted weights;
the next stage re-profiles, re-scores and re-plans from them. On failure the pipeline restores
the original weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._allocator import Selection
from ._factorize import ScaledSVD, build_factors
from ._gradients import GradientPassInfo, Probe, gradient_pass
from ._model import Target

__all__ = ["ModelContext", "RefineContext"]


@dataclass
class ModelContext:
    """The model as a global allocator may see it in ``Allocator.prepare`` (before any planning).

    ``calibration`` holds the calibration windows (never evaluation text), ``gradient_data`` the
    windows for gradients, ``device`` where work should run. Whatever the allocator changes it must
    change back; notes it appends end up in the report.
    """

    model: nn.Module
    targets: list[Target]
    calibration: torch.Tensor
    gradient_data: torch.Tensor
    device: torch.device
    notes: list[str] = field(default_factory=list)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def weight(self, name: str) -> torch.Tensor:
        """The current weight as out x in (a copy in float64)."""
        m = self.module(name)
        w = m.weight.detach()
        return (w.T if type(m).__name__ == "Conv1D" else w).to(torch.float64).clone()

    @torch.no_grad()
    def set_weight(self, name: str, w: torch.Tensor) -> None:
        m = self.module(name)
        w = w.T if type(m).__name__ == "Conv1D" else w
        m.weight.copy_(w.to(device=m.weight.device, dtype=m.weight.dtype))

    def gradient_pass(self, probe: Probe, windows: torch.Tensor | None = None, lean: bool = True) -> GradientPassInfo:
        modules = {t.name: self.module(t.name) for t in self.targets}
        return gradient_pass(self.model, self.gradient_data if windows is None else windows, modules, probe, lean=lean)

    def loss(self, windows: torch.Tensor | None = None, batch_size: int = 8) -> float:
        """Mean next-token cross-entropy of the model on ``windows`` (default: the calibration set)."""
        from ._evaluate import perplexity

        result = perplexity(self.model, self.calibration if windows is None else windows,
                            batch_size=batch_size, device=self.device, progress=False)
        return result.nll


@dataclass
class RefineContext(ModelContext):
    """Between two planning stages: the profiles of the stage that just ran and the teacher weights."""

    profiles: dict[str, ScaledSVD] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)   # original weights, out x in, CPU
    stage: int = 0
    stages: int = 1

    def truncation(self, name: str, selection: Selection) -> torch.Tensor:
        """The dense weight that keeping ``selection`` of this stage's scaled SVD gives (float64)."""
        a, b = build_factors(self.profiles[name], selection)
        return (a @ b).to(torch.float64)
