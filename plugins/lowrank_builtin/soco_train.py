"""SoCo's maths: the reparametrised layers, the exact parameter accounting, the hard mask, the KL.

Every targeted matrix is rewritten in the coordinates of its scaling (whitened: W R = U S V^T) as
W' = (L^-1 U) diag(S * s) (V^T R^-1), with one scale s_i per singular component. The layer
computes it factored, y = ((x B^T) * S s) A^T + bias with A = L^-1 U and B = V^T R^-1, so no
m x n weight is formed per step and the gradient for s is one column sum; at s = 1 and full rank it
is the original layer (up to float32 round-off).

Parameter accounting is the engine's: a matrix keeping k components stores min(m n, k (m + n))
(exact at every integer k: dense above the break-even rank). With soft gates the expected rank is
k = sum_i g_i; the *value* of the compression term is that exact count, but its *gradient* is the
constant slope (m + n) per component (a straight-through surrogate): the exact count is flat
above break-even, so a matrix that starts dense would never feel any pressure. The hard mask
then settles the break-even question exactly (below).

The teacher is the uncompressed model's next-token distribution, cached once as its top-k
log-probabilities plus the log of the remaining mass (no second model is held). The KL is taken
on the coarsened distribution (the top-k tokens and one "rest" bucket): a lower bound of the full
KL that is exact when the top-k carry all the mass.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

import lowrank
from lowrank import breakeven_rank, stored_params

__all__ = ["Layout", "soft_params", "HardMask", "hard_mask", "TeacherCache", "teacher_cache", "topk_kl",
           "log1mexp", "SpectralLinear", "swapped", "segment_summary"]


@dataclass(frozen=True)
class Layout:
    """Where each matrix's components sit in the flat vector of all components.

    Attributes:
        names: Module names, in order.
        shapes: (m, n) per matrix.
        ranks: Components per matrix (min(m, n)).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    ranks: tuple[int, ...]

    @property
    def offsets(self) -> list[int]:
        """Start of each matrix's components, plus the total at the end."""
        return [0, *np.cumsum(self.ranks).tolist()]

    @property
    def dense_params(self) -> int:
        """Parameters of all matrices stored dense."""
        return sum(m * n for m, n in self.shapes)

    def owner(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The matrix index of every component (long, length = total components)."""
        return torch.repeat_interleave(torch.arange(len(self.ranks), device=device),
                                       torch.tensor(self.ranks, device=device))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """One view per matrix of a flat per-component tensor."""
        return list(torch.split(flat, list(self.ranks)))


def soft_params(layout: Layout, gates: torch.Tensor) -> torch.Tensor:
    """Stored parameters at the expected ranks k_j = sum_i g_ij: exact value, slope (m + n).

    The value is sum_j min(m n, k_j (m + n)); the gradient for each gate is its matrix's m + n
    (the exact count has zero slope above break-even, see the module docstring).
    """
    owner = layout.owner(gates.device)
    k = torch.zeros(len(layout.ranks), dtype=gates.dtype, device=gates.device).index_add(0, owner, gates)
    cost = torch.tensor([m + n for m, n in layout.shapes], dtype=gates.dtype, device=gates.device)
    dense = torch.tensor([m * n for m, n in layout.shapes], dtype=gates.dtype, device=gates.device)
    linear = k * cost
    exact = torch.minimum(linear, dense)
    return (linear + (exact - linear).detach()).sum()


@dataclass(frozen=True)
class HardMask:
    """A binary mask over every component that meets the budget with exact accounting.

    Attributes:
        keep: Per component (flat, bool); a dense matrix keeps all of its components.
        ranks: Kept components per matrix before the dense fallback.
        dense: Per matrix, whether it is stored dense (its kept rank stays above break-even).
        params: Parameters stored.
    """

    keep: torch.Tensor
    ranks: tuple[int, ...]
    dense: tuple[bool, ...]
    params: int


def hard_mask(layout: Layout, scores: torch.Tensor, allowed: int, floor: int = 1) -> HardMask:
    """Drop components in ascending ``scores`` (ties: the smaller singular value first) until at
    most ``allowed`` parameters are stored; a matrix whose rank stays above break-even is dense.

    Exact: a matrix saves nothing until its rank reaches r*, then m n - r* (m + n), then (m + n)
    per component, so the result stores at most ``allowed`` and overshoots the saving by less than
    one matrix's m + n. Every matrix keeps at least ``floor`` components.

    Raises:
        lowrank.CompressionError: The budget cannot be met with ``floor``.
    """
    offsets, owner = layout.offsets, layout.owner().numpy()
    within = np.arange(offsets[-1]) - np.asarray(offsets[:-1])[owner]
    order = np.lexsort((-within, scores.detach().double().cpu().numpy()))   # last key is the primary
    ranks = list(layout.ranks)
    stored = [m * n for m, n in layout.shapes]
    total = sum(stored)
    keep = np.ones(offsets[-1], dtype=bool)
    for i in order:
        if total <= allowed:
            break
        j = owner[i]
        if ranks[j] <= floor:
            continue
        keep[i] = False
        ranks[j] -= 1
        now = stored_params(*layout.shapes[j], ranks[j])
        total += now - stored[j]
        stored[j] = now
    if total > allowed:
        raise lowrank.CompressionError(f"allocator 'soco': {allowed} parameters cannot be met keeping {floor} "
                                       "component(s) per matrix")
    dense = tuple(r > breakeven_rank(*s) for r, s in zip(ranks, layout.shapes))
    for j, d in enumerate(dense):
        if d:
            keep[offsets[j]:offsets[j + 1]] = True
    return HardMask(torch.from_numpy(keep), tuple(ranks), dense, total)


# -- the teacher and the KL ------------------------------------------------------------------------


@dataclass
class TeacherCache:
    """The uncompressed model's next-token distribution on the calibration windows, coarsened.

    Attributes:
        logp: Top-k log-probabilities, windows x tokens x k (float32).
        index: Their token ids (int32).
        log_rest: log of the probability outside the top-k, windows x tokens (float32).
    """

    logp: torch.Tensor
    index: torch.Tensor
    log_rest: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Memory held by the cache."""
        return sum(t.numel() * t.element_size() for t in (self.logp, self.index, self.log_rest))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler's switch at -ln 2); x is capped
    just below 0 so that an all-covering top-k gives a tiny rest instead of log 0."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@torch.no_grad()
def teacher_cache(model: nn.Module, windows: torch.Tensor, k: int, device: torch.device,
                  batch_size: int = 4) -> TeacherCache:
    """Run the (uncompressed) model once over ``windows`` and keep its top-``k`` log-probabilities."""
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for start in range(0, windows.shape[0], batch_size):
        logits = model(windows[start:start + batch_size].to(device), use_cache=False).logits
        logp = logits.float().log_softmax(-1)
        top, index = logp.topk(min(k, logp.shape[-1]), dim=-1)
        parts.append((top.cpu(), index.to(torch.int32).cpu(), log1mexp(torch.logsumexp(top, -1)).cpu()))
        del logits, logp
    return TeacherCache(*(torch.cat(p) for p in zip(*parts)))


def topk_kl(logits: torch.Tensor, logp: torch.Tensor, index: torch.Tensor, log_rest: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on the teacher's top-k tokens plus the rest."""
    logq = logits.float().log_softmax(-1)
    q_top = logq.gather(-1, index.long())
    del logq
    kl = (logp.exp() * (logp - q_top)).sum(-1)
    kl = kl + log_rest.exp() * (log_rest - log1mexp(torch.logsumexp(q_top, -1)))
    return kl.mean()


# -- the reparametrised layer ----------------------------------------------------------------------


class SpectralLinear(nn.Module):
    """y = ((x B^T) * (S * scale) + (x B^T) D^T) A^T + bias: a layer in its spectral coordinates.

    ``scale`` (one per component, set before every forward) and the optional deviation ``core``
    D (k x k over the kept components, zero at the start) carry the gradients; A, B, S are fixed.
    """

    def __init__(self, left: torch.Tensor, right: torch.Tensor, sigma: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("left", left)
        self.register_buffer("right", right)
        self.register_buffer("sigma", sigma)
        self.bias = bias
        self.scale: torch.Tensor = torch.ones_like(sigma)
        self.core: torch.Tensor | None = None

    def restricted(self, kept: torch.Tensor) -> "SpectralLinear":
        """The same layer over the kept components only (cheaper; for a fixed mask)."""
        return SpectralLinear(self.left[:, kept], self.right[kept], self.sigma[kept], self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(self.right.dtype) @ self.right.T
        y = z * (self.sigma * self.scale)
        if self.core is not None:
            y = y + z @ self.core.T
        y = y @ self.left.T
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def dense_weight(self) -> torch.Tensor:
        """W' (out x in, float64) with the current scale and deviation."""
        middle = torch.diag((self.sigma * self.scale).detach().double())
        if self.core is not None:
            middle = middle + self.core.detach().double()
        return self.left.double() @ middle @ self.right.double()


@contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Put ``replacements`` (module name -> module) into ``model``; the originals come back on exit."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, new in replacements.items():
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent)
            originals[name] = getattr(holder, child)
            setattr(holder, child, new)
        yield
    finally:
        for name, old in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, old)


def segment_summary(values: Sequence[float]) -> str:
    """min / mean / max of a sequence, for the report."""
    if not values:
        return "-"
    return f"{min(values):.3f}/{sum(values) / len(values):.3f}/{max(values):.3f}"
