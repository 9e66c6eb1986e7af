"""Gradients of the calibration language-model loss, consumed matrix by matrix.

``gradient_pass`` runs forward and backward passes of the mean next-token cross-entropy and hands
each targeted weight's gradient (as out x in, float32) to a probe. In lean mode (the default) the
probe runs inside a post-accumulate-grad hook and the gradient is dropped right after, so no
model-sized gradient is ever held; without it every gradient of a batch is kept until the backward
pass ends (the plain way, kept for comparison).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .._contract.context import GradientPassInfo, Probe
from .._contract.model import as_out_in

__all__ = ["gradient_pass", "reset_gpu_peak", "max_gpu_bytes"]

# gradient_pass resets CUDA's peak counter to measure its own peak; what the counter held before
# is carried here so that ``max_gpu_bytes`` still gives the peak since ``reset_gpu_peak``.
_CARRIED_PEAK: dict[int, int] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def reset_gpu_peak(device: torch.device) -> None:
    """Start measuring peak GPU memory on ``device`` (``max_gpu_bytes`` reads it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _CARRIED_PEAK.pop(_index(device), None)


def max_gpu_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated since ``reset_gpu_peak``, gradient passes in between included."""
    if device.type != "cuda":
        return 0
    return max(_CARRIED_PEAK.get(_index(device), 0), torch.cuda.max_memory_allocated(device))


def gradient_pass(model: nn.Module, windows: torch.Tensor, modules: dict[str, nn.Module], probe: Probe,
                  *, lean: bool = True, batch_size: int = 1) -> GradientPassInfo:
    """Call ``probe(name, grad)`` for every module in ``modules`` and every batch of ``windows``.

    Only the targeted weights require gradients during the pass; every ``requires_grad`` flag is
    restored afterwards and no ``.grad`` is left behind.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    weights = {name: m.weight for name, m in modules.items()}
    device = next(iter(weights.values())).device
    handles = []
    start = time.perf_counter()
    total_loss, batches = 0.0, 0
    if device.type == "cuda":
        _CARRIED_PEAK[_index(device)] = max_gpu_bytes(device)
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        if lean:
            for name, w in weights.items():
                def hook(p: torch.Tensor, name: str = name) -> None:
                    probe(name, as_out_in(modules[name], p.grad.detach().float()))
                    p.grad = None

                handles.append(w.register_post_accumulate_grad_hook(hook))
        model.eval()
        embed_device = model.get_input_embeddings().weight.device
        for batch in windows.split(batch_size):
            ids = batch.to(embed_device)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device))
                del logits
                loss.backward()
            total_loss += float(loss.detach())
            batches += 1
            if not lean:
                for name, w in weights.items():
                    probe(name, as_out_in(modules[name], w.grad.detach().float()))
                    w.grad = None
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return GradientPassInfo(batches, int(windows.numel() - windows.shape[0]), time.perf_counter() - start,
                            total_loss / max(batches, 1), peak, lean)
