"""Capturing what each decoder block receives, without running the blocks.

Every block is swapped for a pass-through stub that records its positional and keyword arguments
(attention masks, rotary tables, ... which differ per block in sliding-window models such as
Gemma 3) and the first block's hidden states. The last stub stops the forward pass, so neither the
blocks nor the lm_head ever run here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._contract.blocks import BlockInputs

__all__ = ["capture_block_inputs", "to_device"]


class _Stop(Exception):
    pass


class _Stub(nn.Module):
    def __init__(self, index: int, last: bool, sink: dict[int, tuple[tuple, dict]], hidden: list) -> None:
        super().__init__()
        self.index, self.last, self.sink, self.hidden = index, last, sink, hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if self.index == 0:
            self.hidden.append(hidden)
        self.sink[self.index] = (rest, kwargs)
        if self.last:
            raise _Stop
        return hidden


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (lists, tuples, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor],
                         device: torch.device) -> BlockInputs:
    """Run the embeddings on every batch and record what each block would receive (on ``device``)."""
    originals = list(blocks)
    hidden: list[torch.Tensor] = []
    extra: dict[tuple[int, int], dict[int, tuple[tuple, dict]]] = {}
    embed_device = model.get_input_embeddings().weight.device
    try:
        for batch in batches:
            sink: dict[int, tuple[tuple, dict]] = {}
            for i in range(len(originals)):
                blocks[i] = _Stub(i, i == len(originals) - 1, sink, hidden)
            try:
                model(input_ids=batch.to(embed_device), use_cache=False)
            except _Stop:
                pass
            shape = tuple(batch.shape[:2])
            if shape not in extra:
                extra[shape] = {i: to_device(v, device) for i, v in sink.items()}
            hidden[-1] = hidden[-1].to(device)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if len(hidden) != len(batches):
        raise RuntimeError("could not capture the first decoder block's inputs")
    return BlockInputs(hidden, extra)
