"""The engine's side of the contexts a global allocator receives: running the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._contract.context import GradientPassInfo, ModelContext, Probe, RefineContext
from .gradients import gradient_pass
from .losses import next_token_nll

__all__ = ["EngineModelContext", "EngineRefineContext"]


class _RunsTheModel:
    """``gradient_pass`` and ``loss`` of :class:`~lowrank.ModelContext`, on the engine's functions."""

    def gradient_pass(self: ModelContext, probe: Probe, windows: torch.Tensor | None = None,  # type: ignore[misc]
                      lean: bool = True) -> GradientPassInfo:
        modules = {t.name: self.module(t.name) for t in self.targets}
        return gradient_pass(self.model, self.gradient_data if windows is None else windows, modules, probe, lean=lean)

    def loss(self: ModelContext, windows: torch.Tensor | None = None, batch_size: int = 8) -> float:  # type: ignore[misc]
        total, tokens = next_token_nll(self.model, self.calibration if windows is None else windows,
                                       batch_size=batch_size, device=self.device)
        return total / tokens


@dataclass
class EngineModelContext(_RunsTheModel, ModelContext):
    """A :class:`~lowrank.ModelContext` whose model-running methods are the engine's."""


@dataclass
class EngineRefineContext(_RunsTheModel, RefineContext):
    """A :class:`~lowrank.RefineContext` whose model-running methods are the engine's."""
