"""SoCo's starting point: importance logits from the first-order loss change of pruning each component.

The paper starts every scale at s = 1 and lets training sort the components. At s = 1 the KL to
the teacher is at its minimum, so its gradient is zero and carries no ranking: the first steps of
an s = 1 start are spent only on the budget term, and with an adaptive optimiser (which moves
every logit by about its learning rate, whatever the gradient's size) the ranking that comes out
of a short run is mostly the tie-break. That is what the CPU setting measured (stage 1 reached
0.07 of a 0.2 budget, and its mask lost to zero-sum at every ratio).

So the logits start from information the model already gives for one backward pass per window:
the next-token cross-entropy's gradient at s = 1, the first-order estimate of the loss change
when component i is pruned (Delta_i = -dL/ds_i = -sigma_i dL/dsigma_i, exactly the score zero-sum
uses in whitened coordinates). ``init: zero-sum`` (the default) orders the components as
zero-sum's greedy selection deletes them (from the end of each spectrum, balancing predicted
gains and losses); ``init: first-order`` orders them by |Delta_i| / (m + n), a knapsack's greedy
order (measured worse: the mask ignores singular-value order within a matrix). Either order gives
an exact-budget hard mask, and the logits are placed so that this mask is exactly the one the
starting logits give:

    theta_i = spread * z_i,  z_i in (0, 1] for the kept components (by rank of their priority),
                             z_i in [-1, 0) for the pruned ones,

so every gate starts on the right side of 1/2, ordered, and the stages then correct the
first-order ranking with the KL of the actual compressed model (``init: uniform`` is the paper's
s = 1 start, kept as the ablation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .soco_train import HardMask, Layout, hard_mask
from .zero_sum import component_floor, published_keep_rank_ratio, zero_sum_ranks

if TYPE_CHECKING:
    from .soco_stages import Trainer

__all__ = ["first_order_gain", "placed_logits", "zero_sum_priority", "warm_start"]


def first_order_gain(trainer: "Trainer", windows: int) -> torch.Tensor:
    """Delta_i = -dL/ds_i at s = 1: the first-order loss change of pruning each component.

    L is the mean next-token cross-entropy on the first ``windows`` calibration windows (one
    backward each, gradients summed), with every layer at full rank.
    """
    scale = torch.ones(trainer.layout.offsets[-1], device=trainer.device, requires_grad=True)
    total = torch.zeros_like(scale)
    count = min(windows, trainer.windows.shape[0])
    for i in range(count):
        trainer.set_scales(scale)
        tokens = trainer.windows[i:i + 1].to(trainer.device)
        logits = trainer.model(tokens, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        (grad,) = torch.autograd.grad(loss, scale)
        total += grad.detach()
        del logits, loss
    trainer.set_scales(torch.ones_like(scale))
    return -total / count


def placed_logits(layout: Layout, priority: torch.Tensor, allowed: int, spread: float) -> tuple[torch.Tensor, HardMask]:
    """Logits whose hard mask is the exact-budget mask of ``priority``, ranked within each side.

    Components of a matrix that the mask keeps dense count as kept.
    """
    mask = hard_mask(layout, priority, allowed)
    keep = mask.keep.to(priority.device)
    theta = torch.empty_like(priority, dtype=torch.float32)
    for side, sign in ((keep, 1.0), (~keep, -1.0)):
        n = int(side.sum())
        if n == 0:
            continue
        # ascending rank within the side, mapped to (0, 1] (kept) or [-1, 0) (pruned)
        rank = torch.empty(n, device=priority.device)
        rank[priority[side].argsort()] = torch.arange(n, device=priority.device, dtype=torch.float32)
        z = (rank + 1) / n if sign > 0 else -(n - rank) / n
        theta[side] = spread * z
    return theta, mask


def zero_sum_priority(layout: Layout, gain: torch.Tensor, ratio: float) -> torch.Tensor:
    """Priority of every component in zero-sum's greedy order: its deletion step (earlier: lower).

    The selection runs past the budget, down to the floors (``published_keep_rank_ratio`` of the
    ratio), so the exact-budget mask of this priority is a prefix of the deletions: the plan
    zero-sum makes from the same scores. Components no deletion reaches (the floors) rank last,
    in singular-value order.
    """
    scores = [g.tolist() for g in layout.split(gain.double().cpu())]
    floors = [component_floor(shape, published_keep_rank_ratio(ratio)) for shape in layout.shapes]
    removed: list[tuple[int, int]] = []
    zero_sum_ranks(layout.shapes, scores, 0, floors, removed)
    offsets = layout.offsets
    total = offsets[-1]
    priority = torch.empty(total, dtype=torch.float64)
    owner = layout.owner()
    within = torch.arange(total) - torch.tensor(offsets[:-1])[owner]
    priority[:] = float(2 * total) - within.double()   # floors: last, the larger singular values above
    for step, (j, i) in enumerate(removed):
        priority[offsets[j] + i] = float(step)
    return priority.to(gain.device)


def warm_start(trainer: "Trainer", init: str, windows: int, spread: float) -> HardMask:
    """Set ``trainer.theta`` from the first-order gains (``init``: ``zero-sum`` order or ``first-order``
    magnitude per stored parameter) and return the mask it starts from."""
    layout = trainer.layout
    gain = first_order_gain(trainer, windows)
    if init == "zero-sum":
        priority = zero_sum_priority(layout, gain, 1.0 - trainer.allowed / layout.dense_params)
    else:
        cost = torch.tensor([m + n for m, n in layout.shapes], dtype=gain.dtype, device=gain.device)
        priority = gain.abs() / cost[layout.owner(gain.device)]
    theta, mask = placed_logits(layout, priority, trainer.allowed, spread)
    with torch.no_grad():
        trainer.theta.copy_(theta)
    return mask
