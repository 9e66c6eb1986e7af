"""Small helpers about a model's modules that the engine, the formats and plugins share.

GPT-2's ``Conv1D`` stores its weight transposed (in x out); every place that reads or writes a
weight goes through :func:`weight_of` / :func:`set_weight_of`, so that convention lives here only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Target", "is_conv1d", "is_linear", "weight_of", "set_weight_of", "as_out_in", "set_submodule",
           "count_parameters", "max_positions", "num_layers", "text_config"]


@dataclass(frozen=True)
class Target:
    """One targeted linear layer.

    Attributes:
        name: Full module name in the model.
        block: Decoder block index.
        local: Name inside the block.
        shape: (out, in).
    """

    name: str
    block: int
    local: str
    shape: tuple[int, int]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), identified by name to keep imports light."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as (out x in), whatever the layer's storage convention (a view, not a copy)."""
    return module.weight.T if is_conv1d(module) else module.weight


def as_out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``module.weight`` (e.g. its gradient), as (out x in)."""
    return tensor.T if is_conv1d(module) else tensor


@torch.no_grad()
def set_weight_of(module: nn.Module, w: torch.Tensor) -> None:
    """Copy ``w`` (out x in) into the module's weight, in its dtype and on its device."""
    w = w.T if is_conv1d(module) else w
    module.weight.copy_(w.to(device=module.weight.device, dtype=module.weight.dtype))


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Replace ``root.<name>`` with ``module``; returns the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def count_parameters(model: nn.Module) -> int:
    """A model's parameters, each shared (tied) tensor once.

    ``nn.Module.parameters`` already skips a ``Parameter`` object registered twice; this also
    catches distinct ``Parameter`` objects that view the same storage.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for param in model.parameters():
        if param.device.type == "meta":
            key = (id(param), -1, tuple(param.shape))  # meta tensors have no storage
        else:
            key = (param.data_ptr(), param.numel(), tuple(param.shape))
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


def text_config(model: nn.Module) -> object | None:
    """The model's (text) config, when it has one."""
    config = getattr(model, "config", None)
    return getattr(config, "get_text_config", lambda: config)() if config is not None else None


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    config = text_config(model)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def num_layers(model: nn.Module) -> int | None:
    """The number of decoder blocks the config declares."""
    config = text_config(model)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None
