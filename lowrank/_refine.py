"""What a multi-stage global allocator may do between its stages (e.g. ZS-SVD's correction).

Between two planning passes the pipeline hands the allocator a ``RefineContext``: the model with
its current weights, the profiles (scaled SVDs) of the pass that just ran, the original (teacher)
weights, and a way to take calibration-loss gradients. The allocator may change targeted weights;
the next stage re-profiles, re-scores and re-plans from them. On failure the pipeline restores
the original weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._allocator import Selection
from ._factorize import ScaledSVD, build_factors
from ._gradients import GradientPassInfo, Probe, gradient_pass
from ._model import Target

__all__ = ["RefineContext"]


@dataclass
class RefineContext:
    model: nn.Module
    targets: list[Target]
    profiles: dict[str, ScaledSVD]
    teacher: dict[str, torch.Tensor]        # original weights, out x in, on the CPU
    gradient_data: torch.Tensor
    stage: int
    stages: int
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

    def truncation(self, name: str, selection: Selection) -> torch.Tensor:
        """The dense weight that keeping ``selection`` of this stage's scaled SVD gives (float64)."""
        a, b = build_factors(self.profiles[name], selection)
        return (a @ b).to(torch.float64)

    def gradient_pass(self, probe: Probe, windows: torch.Tensor | None = None, lean: bool = True) -> GradientPassInfo:
        modules = {t.name: self.module(t.name) for t in self.targets}
        return gradient_pass(self.model, self.gradient_data if windows is None else windows, modules, probe, lean=lean)

    def extra(self) -> dict[str, Any]:
        return {"stage": self.stage, "stages": self.stages}
