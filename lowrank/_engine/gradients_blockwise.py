"""The gradient pass one decoder block at a time, for runs that never hold the whole model.

A streamed run (``_engine/stream.py``) keeps only the embeddings, the head and one block in
memory, so the plain :func:`~lowrank._engine.gradients.gradient_pass` (one forward and one backward
through the whole model) cannot run. This pass computes the very same gradients with block-level
activation checkpointing:

1. forward: the gradient windows go through the blocks one at a time without autograd, and the
   hidden states entering each block are kept on the host (windows x tokens x hidden per block:
   for one 512-token window of an 8B model, 8 MiB a block);
2. head: the model's own forward runs with every block replaced by a stub, the first of which
   hands over the last hidden states (which require grad), so the final norm, the head and any
   logit soft-capping are the model's; the loss's gradient with respect to those states results;
3. backward: from the last block to the first, each block runs again on its saved inputs with
   autograd, the output gradient is back-propagated, the targeted weights' gradients go to the
   probe (and are dropped), and the input gradient is carried to the block before.

Each block is read twice (steps 1 and 3), through the run's :class:`BlockHooks` like every other
pass. The probe sees one gradient per batch, as with the plain pass.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._contract.blocks import run_block
from .._contract.context import GradientPassInfo, Probe
from .._contract.model import as_out_in
from .capture import capture_block_inputs
from .gradients import gradient_pass
from .setup import RunSetup, model_on_device, naming_block, on_device

__all__ = ["blockwise_gradient_pass", "run_gradient_pass"]


def run_gradient_pass(setup: RunSetup, windows: torch.Tensor, probe: Probe, lean: bool = True) -> GradientPassInfo:
    """The run's gradient pass: through the whole model on the compute device, or one block at a
    time when the run streams its blocks from disk (the same gradients, each block read twice)."""
    if setup.hooks.streams_blocks:
        return blockwise_gradient_pass(setup, windows, probe)
    with model_on_device(setup):
        return gradient_pass(setup.model, windows, setup.modules(), probe, lean=lean)


class _Handover(nn.Module):
    """Stands in for block ``index`` during the head pass: the first one returns the given states."""

    def __init__(self, hidden: torch.Tensor | None) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        incoming = args[0] if args else kwargs["hidden_states"]
        return self.hidden if self.hidden is not None else incoming


def _head_loss(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy of the model whose last block produced ``last``."""
    originals = list(blocks)
    try:
        for i in range(len(originals)):
            blocks[i] = _Handover(last if i == 0 else None)
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device))


def blockwise_gradient_pass(setup: RunSetup, windows: torch.Tensor, probe: Probe,
                            batch_size: int = 1) -> GradientPassInfo:
    """Call ``probe(name, grad)`` for every targeted module and every batch of ``windows``, reading
    each block through ``setup.hooks`` (twice) and never running more than one block at a time."""
    start = time.perf_counter()
    model = setup.model
    home = model.get_input_embeddings().weight.device
    batches = list(windows.split(batch_size))
    # nothing outside the blocks trains: no gradient for the embeddings or a (tied) head
    outside = [p for n, p in model.named_parameters() if not n.startswith(f"{setup.prefix}.")]
    flags = [p.requires_grad for p in outside]
    was_training = model.training
    model.eval()
    try:
        for p in outside:
            p.requires_grad_(False)
        loss = _passes(setup, batches, probe, home)
    finally:
        for p, flag in zip(outside, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    tokens = int(windows.numel() - windows.shape[0])
    return GradientPassInfo(len(batches), tokens, time.perf_counter() - start, loss)


def _passes(setup: RunSetup, batches: list[torch.Tensor], probe: Probe, home: torch.device) -> float:
    """Forward, head and backward (module docstring); returns the mean loss over the batches."""
    model, blocks, device = setup.model, setup.blocks, setup.device
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks, batches, device)
    saved: list[list[torch.Tensor]] = []   # saved[i][b]: block i's input for batch b, on the host
    hidden = inputs.hidden
    for index in setup.bar("gradients, forward"):
        saved.append([h.to("cpu") for h in hidden])
        setup.hooks.enter(index, "gradients")
        with naming_block(index, len(blocks)), on_device(blocks[index], device) as block, torch.no_grad():
            hidden = [run_block(block, h, *inputs.args_for(index, h)) for h in hidden]
        setup.hooks.leave(index, "gradients", inputs)
    grads, total_loss = [], 0.0
    for ids, last in zip(batches, hidden):
        last = last.detach().to(home).requires_grad_(True)
        with torch.enable_grad():
            loss = _head_loss(model, blocks, ids.to(home), last)
            loss.backward()
        total_loss += float(loss.detach())
        grads.append(last.grad.to(device))
    for step in setup.bar("gradients, backward"):
        index = len(blocks) - 1 - step
        setup.hooks.enter(index, "gradients")
        with naming_block(index, len(blocks)), on_device(blocks[index], device) as block:
            grads = _block_backward(setup, index, block, saved.pop(), grads, inputs, probe)
        setup.hooks.leave(index, "gradients", inputs)
    return total_loss / max(len(batches), 1)


def _block_backward(setup: RunSetup, index: int, block: nn.Module, entering: list[torch.Tensor],
                    out_grads: list[torch.Tensor], inputs: Any, probe: Probe) -> list[torch.Tensor]:
    """Back-propagate each batch's output gradient through block ``index``: the targeted weights'
    gradients go to ``probe``; returns the gradients of the block's inputs."""
    modules = {t.name: block.get_submodule(t.local) for t in setup.targets_of(index)}
    params = list(block.parameters())
    flags = [p.requires_grad for p in params]
    in_grads = []
    try:
        for p in params:
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
        for h, g in zip(entering, out_grads):
            h = h.to(setup.device).requires_grad_(True)
            with torch.enable_grad():
                out = run_block(block, h, *inputs.args_for(index, h))
                out.backward(g)
            for name, m in modules.items():
                probe(name, as_out_in(m, m.weight.grad.detach().float()))
                m.weight.grad = None
            in_grads.append(h.grad.detach())
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
    return in_grads
