"""Input validation and the undo log that keeps a failed compression from changing the model."""

from __future__ import annotations

import torch
from torch import nn

from .._contract.errors import CompressionError
from .._contract.model import max_positions, set_submodule

__all__ = ["validate_inputs", "check_weights", "Undo"]


def validate_inputs(model: nn.Module, calibration: torch.Tensor) -> None:
    """Refuse calibration that is not token ids the model can read, and non-finite weights."""
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
    limit = max_positions(model)
    if limit is not None and calibration.shape[1] > limit:
        raise CompressionError(
            f"calibration: windows of {calibration.shape[1]} tokens are longer than the model's context "
            f"of {limit} positions (max_position_embeddings / n_positions); use windows of at most {limit} tokens"
        )
    check_weights(model)


def check_weights(model: nn.Module) -> None:
    """Refuse a model with a NaN or infinite weight, naming the first one (weights not loaded yet,
    on the meta device in a streamed run, are checked when their block is read)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not torch.isfinite(p).all():
            raise CompressionError(f"the model has non-finite (NaN or inf) weights in {name}; nothing was changed")


class Undo:
    """Records swapped layers and overwritten weights so a failure puts the originals back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.swaps: list[tuple[str, nn.Module]] = []
        self.weights: dict[str, torch.Tensor] = {}

    def swap(self, name: str, module: nn.Module) -> None:
        self.swaps.append((name, set_submodule(self.model, name, module)))

    def save_weight(self, name: str) -> None:
        if name not in self.weights:
            self.weights[name] = self.model.get_submodule(name).weight.detach().to("cpu", copy=True)

    @torch.no_grad()
    def rollback(self) -> None:
        for name, old in reversed(self.swaps):
            set_submodule(self.model, name, old)
        for name, w in self.weights.items():
            p = self.model.get_submodule(name).weight
            p.copy_(w.to(p.device))
        self.swaps.clear()
        self.weights.clear()
