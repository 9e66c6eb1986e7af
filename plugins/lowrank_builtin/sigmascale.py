"""SigmaScale: learned diagonal row and column scalings before the truncated SVD (Lavrinovics et al., 2026).

Two vectors per matrix, d_r (out) and d_c (in), define D_r = diag(exp(d_r)) and D_c = diag(exp(d_c));
the compressed weight is W' = D_r^-1 Trunc_k(D_r W D_c) D_c^-1 and the vectors minimise

    loss = ||(W - W') X||_F^2 / (T m n)        (X: n x T calibration inputs)

by AdamW (as published; ``optimizer: lbfgs`` is the cheaper option) through the truncation. The
pipeline then factors the learned scaled matrix exactly like
any other scaling's: A = D_r^-1 U_k S_k^1/2, B = S_k^1/2 V_k^T D_c^-1.

Speed (``loss: gram``, the default): the loss is tr(D C D^T) / (m n) with D = W - W' and C the
inputs' second moment, so no token is touched while learning; Trunc_k is a custom autograd
function (``truncation: eigh``: eigendecomposition of the smaller Gram matrix of the scaled weight;
``svd``: its thin SVD) whose backward only involves the gaps between kept and dropped singular values;
same-shaped matrices of a block (q/o, k/v, gate/up in Llama) are optimised as one batch. The
published computation is kept as ``loss: activations`` + ``truncation: autograd`` (the loss over the
raw inputs, gradients through ``torch.linalg.svd``).

Compositions: ``init: asvd`` starts d_c at ASVD's column scaling; stacked after whitening
(``scalings: [whitening, sigmascale]``) it learns in whitened coordinates; ``objective: block``
minimises the decoder block's output error instead of the layer's (the layer loss is what whitening
already minimises exactly, so only the block target can improve on it).

The returned scaling is the best iterate, checked in float64 against the identity: the learned
loss never ends above the identity start.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from pydantic import Field

import lowrank
from lowrank import (
    Diagonal,
    LayerStats,
    SpectrumChange,
    Transform,
    effective_rank_tensor,
    participation_ratio_tensor,
    spectrum_diagnostics,
)

__all__ = ["SigmaScale", "SigmaScaleConfig", "TruncSVD", "TruncEigh", "truncate", "reconstruct"]


# ------------------------------------------------------------------------------------------------
# Trunc_k with a backward that only involves the gaps between kept and dropped singular values
#
# A = U S V^T (thin), 1 = kept (first k), 2 = dropped, G = dL/dTrunc_k(A), G_ab = U_a^T G V_b:
#   dL/dA = U_1 G_11 V_1^T + (I - U U^T) G V_1 V_1^T + U_1 U_1^T G (I - V V^T)
#           + U_2 H_21 V_1^T + U_1 H_12 V_2^T,
#   H_21[j,i] = a_ij G_21[j,i] + b_ij G_12[i,j],  H_12[i,j] = b_ij G_21[j,i] + a_ij G_12[i,j],
#   a_ij = s_i^2 / (s_i^2 - s_j^2),  b_ij = s_i s_j / (s_i^2 - s_j^2)   (i kept, j dropped).
# Degeneracies inside the kept or the dropped set cancel analytically (Trunc_k does not depend on
# the basis chosen inside either set); 1/(s_i^2 - s_j^2) is regularised as
# g / (g^2 + eps s_1^4) so the gradient stays finite when s_k = s_k+1.


def _inverse_gaps(lam: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """(..., k, r-k): regularised 1 / (lam_i - lam_j) for i kept, j dropped (lam = s^2, descending)."""
    gap = lam[..., :k, None] - lam[..., None, k:]
    scale = eps * lam.amax(-1, keepdim=True)[..., None].pow(2) + torch.finfo(lam.dtype).tiny
    return gap / (gap * gap + scale)


class TruncSVD(torch.autograd.Function):
    """(Trunc_k(A), s) from the thin SVD; batched over leading dimensions."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, k: int, eps: float):  # type: ignore[override]
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        v = vh.mT
        f = (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]
        ctx.save_for_backward(u, s, v)
        ctx.k, ctx.eps = k, eps
        return f, s

    @staticmethod
    def backward(ctx, g_f: torch.Tensor | None, g_s: torch.Tensor | None):  # type: ignore[override]
        u, s, v = ctx.saved_tensors
        k = ctx.k
        grad = torch.zeros(*u.shape[:-1], v.shape[-2], dtype=u.dtype, device=u.device)
        if g_f is not None:
            gv = g_f @ v                     # G V      (m x r)
            gt = u.mT @ gv                   # U^T G V  (r x r)
            mid = torch.zeros_like(gt)
            mid[..., :k, :k] = gt[..., :k, :k]
            if k < s.shape[-1]:
                c = _inverse_gaps(s * s, k, ctx.eps)                    # (k, r-k)
                a_ = (s[..., :k, None] ** 2) * c
                b_ = s[..., :k, None] * s[..., None, k:] * c
                g21, g12 = gt[..., k:, :k], gt[..., :k, k:]
                mid[..., k:, :k] = a_.mT * g21 + b_.mT * g12.mT
                mid[..., :k, k:] = b_ * g21.mT + a_ * g12
            grad = u @ mid @ v.mT
            grad = grad + (gv[..., :k] - u @ gt[..., :, :k]) @ v[..., :k].mT            # (I-UU^T) G V1 V1^T
            grad = grad + u[..., :k] @ (u[..., :k].mT @ g_f - gt[..., :k, :] @ v.mT)    # U1 U1^T G (I-VV^T)
        if g_s is not None:
            grad = grad + (u * g_s[..., None, :]) @ v.mT
        return grad, None, None


class TruncEigh(torch.autograd.Function):
    """(Trunc_k(A), s) from the eigendecomposition of the smaller Gram matrix; batched.

    For a tall A (m >= n; a wide one is transposed), B = A^T A = V diag(lam) V^T and
    Trunc_k(A) = A P with P = V_1 V_1^T. Differentiating P (first-order perturbation of an
    invariant subspace) gives dL/dA = G P + A V (Z + Z^T) V^T with, for i kept and j dropped,
    Z[j,i] = (K_ij + K_ji) / (lam_i - lam_j), K = V^T A^T G V: the same gaps as the SVD form, no
    division by a singular value. The Gram matrix and its eigendecomposition run in ``work``
    precision (float64 by default: squaring A squares its condition number).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, k: int, eps: float, work: torch.dtype | None):  # type: ignore[override]
        wide = a.shape[-2] < a.shape[-1]
        t = a.mT if wide else a
        tw = t.to(work) if work is not None else t
        lam, v = torch.linalg.eigh(tw.mT @ tw)
        lam, v = lam.flip(-1).clamp_min(0), v.flip(-1)
        v = v.to(a.dtype)
        av = t @ v
        f = av[..., :k] @ v[..., :k].mT
        ctx.save_for_backward(av, v, lam)
        ctx.k, ctx.eps, ctx.wide = k, eps, wide
        s = lam.sqrt().to(a.dtype)
        return (f.mT if wide else f), s

    @staticmethod
    def backward(ctx, g_f: torch.Tensor | None, g_s: torch.Tensor | None):  # type: ignore[override]
        av, v, lam = ctx.saved_tensors
        k = ctx.k
        n = v.shape[-1]
        z = torch.zeros(*v.shape[:-2], n, n, dtype=v.dtype, device=v.device)
        grad = torch.zeros_like(av)
        if g_f is not None:
            g = g_f.mT if ctx.wide else g_f
            gv = g @ v
            if k < n:
                kt = av.mT @ gv                                           # V^T A^T G V
                c = _inverse_gaps(lam, k, ctx.eps).to(v.dtype)            # (k, n-k)
                z21 = (c * (kt[..., :k, k:] + kt[..., k:, :k].mT)).mT    # (n-k, k)
                z[..., k:, :k] = z21
                z[..., :k, k:] = z21.mT
            grad = gv[..., :k] @ v[..., :k].mT
        if g_s is not None:
            s = lam.sqrt().to(v.dtype)
            inv = torch.where(s > 0, g_s / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
            z = z + torch.diag_embed(inv)
        grad = grad + av @ z @ v.mT
        return (grad.mT if ctx.wide else grad), None, None, None


def truncate(a: torch.Tensor, k: int, method: str = "eigh", eps: float = 1e-12,
             work: torch.dtype | None = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(Trunc_k(a), singular values of a), differentiable, batched over leading dimensions.

    ``method``: ``eigh`` (Gram eigendecomposition, custom backward), ``svd`` (thin SVD, custom
    backward) or ``autograd`` (``torch.linalg.svd`` and its own backward, as published).
    """
    r = min(a.shape[-2], a.shape[-1])
    if k >= r:
        return a, torch.linalg.svdvals(a.detach())
    if method == "eigh":
        return TruncEigh.apply(a, k, eps, work)
    if method == "svd":
        return TruncSVD.apply(a, k, eps)
    if method == "autograd":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :], s
    raise ValueError(f"unknown truncation method {method!r}")


def reconstruct(w: torch.Tensor, d_r: torch.Tensor, d_c: torch.Tensor, k: int, method: str = "eigh",
                eps: float = 1e-12, noise: torch.Tensor | None = None,
                work: torch.dtype | None = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', s): W' = D_r^-1 Trunc_k(D_r W D_c) D_c^-1 and the spectrum of D_r W D_c; batched."""
    er, ec = d_r.exp(), d_c.exp()
    a = er[..., :, None] * w * ec[..., None, :]
    if noise is not None:
        a = a + noise
    f, s = truncate(a, k, method, eps, work)
    return f / er[..., :, None] / ec[..., None, :], s


# ------------------------------------------------------------------------------------------------
# The scaling


@lowrank.strategy_config
class SigmaScaleConfig:
    steps: int = Field(1000, ge=0, le=1_000_000, description="AdamW steps (L-BFGS: iterations) per matrix, per phase when sequential; published 1000")
    lr: float = Field(5e-3, gt=0.0, le=10.0, description="AdamW learning rate (published 5e-3)")
    init: Literal["identity", "asvd"] = Field(
        "identity", description="identity: d ~ N(0, (init_std * std(W))^2); asvd: d_c starts at ASVD's alpha * log(mean |x|)")
    alpha: float = Field(0.5, gt=0.0, le=4.0, description="ASVD exponent for init: asvd")
    init_std: float = Field(0.1, ge=0.0, le=10.0, description="init std of d, relative to std(W) (published 0.1)")
    train: Literal["both", "rows", "cols"] = Field("both", description="which vectors learn (the other stays at identity)")
    sequential: bool = Field(False, description="train d_r for `steps`, then d_c for `steps` (published option)")
    l2: float = Field(1e-6, ge=0.0, description="L2 penalty on d, added to the loss and as AdamW weight decay (published 1e-6)")
    rank_term: Literal["none", "entropy", "participation"] = Field(
        "none", description="add the effective rank of the kept spectrum (divided by k) to the objective")
    rank_term_weight: float = Field(1e-2, ge=0.0, description="weight of rank_term (the loss term is 1 at identity)")
    noise: float = Field(1e-6, ge=0.0, description="std of Gaussian noise added to the scaled W before each training truncation (published 1e-6)")
    loss: Literal["gram", "activations"] = Field(
        "gram", description="gram: tr(D C D^T)/(mn) from the second moment (fast); activations: over the raw inputs (published)")
    objective: Literal["layer", "block"] = Field(
        "layer", description="layer: the layer's output error; block: the decoder block's output error")
    block_windows: int = Field(2, ge=1, le=1024, description="calibration batches of the block used by objective: block")
    block_mode: Literal["single", "joint"] = Field(
        "single", description="objective: block: single replaces one matrix at a time; joint replaces all of the block's at once")
    truncation: Literal["eigh", "svd", "autograd"] = Field(
        "eigh", description="eigh/svd: custom gap-only backward; autograd: torch.linalg.svd's backward (published)")
    precision: Literal["float32", "float64"] = Field(
        "float32", description="optimisation precision (the final check and factorization are float64)")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="AdamW learning rate: constant (published default) or cosine-annealed to 0 over `steps`")
    optimizer: Literal["adamw", "lbfgs"] = Field(
        "adamw", description="adamw (published); lbfgs: strong-Wolfe L-BFGS, `steps` = iterations, no noise (~30 suffice)")
    batched: bool = Field(True, description="optimise same-shaped matrices of a block as one batch (adamw)")
    patience: int = Field(0, ge=0, description="early stopping: stop a matrix after this many steps without a min_delta improvement; 0: never")
    min_delta: float = Field(1e-4, ge=0.0, lt=1.0, description="relative improvement of the best loss that counts for patience")
    gap_eps: float = Field(1e-12, gt=0.0, lt=1.0, description="1/(s_i^2-s_j^2) -> g/(g^2 + gap_eps s_1^4) in the backward")
    seed: int = Field(0, ge=0, description="seeds the initialization and the noise")


@dataclass
class _Item:
    """One matrix being learned."""

    index: int
    w: torch.Tensor                  # incoming coordinates, float64, on the compute device
    stats: LayerStats
    rank: int
    d_r0: torch.Tensor = None        # type: ignore[assignment]
    d_c0: torch.Tensor = None        # type: ignore[assignment]
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.w.shape[0], self.w.shape[1])


class SigmaScale(lowrank.Scaling):
    """Learned diagonal row and column scalings D_r W D_c, optimised through the truncated SVD."""

    name = "sigmascale"
    Config = SigmaScaleConfig

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        need = {"gram"}
        if self.config.init == "asvd":
            need.add("abs_mean")
        if self.config.loss == "activations" and self.config.objective == "layer":
            need.add("inputs")
        if self.config.objective == "block":
            need.add("block")
        return frozenset(need)

    # -- protocol -----------------------------------------------------------------------------

    def fit(self, weight, stats, rank=None):
        return self.fit_batch([(weight, stats, rank)])[0]

    def fit_batch(self, items):
        cfg = self.config
        out: list[Transform | None] = [None] * len(items)
        todo: list[_Item] = []
        for i, (w, stats, rank) in enumerate(items):
            item = _Item(i, w.to(torch.float64), stats, -1)
            self._initialize(item)
            m, n = item.shape
            if rank is None:
                out[i] = self._transform(item, item.d_r0, item.d_c0,
                                         ["no rank given (a global allocator's profiling pass, or a matrix kept dense): "
                                          "initialization returned without learning"], {})
            elif rank <= 0 or rank >= min(m, n):
                out[i] = Transform(notes=[*item.notes, "rank 0 or full: nothing to learn, identity kept"])
            else:
                item.rank = int(rank)
                todo.append(item)
        if todo:
            if cfg.objective == "block" and cfg.block_mode == "joint":
                groups = [todo]
            elif cfg.batched and cfg.optimizer == "adamw":  # L-BFGS's line search would couple a batch
                keyed: dict[tuple, list[_Item]] = {}
                for it in todo:
                    keyed.setdefault((it.shape, it.rank), []).append(it)
                groups = list(keyed.values())
            else:
                groups = [[it] for it in todo]
            for group in groups:
                for it, t in zip(group, _Learner(self.config, group).run()):
                    out[it.index] = t
        return out  # type: ignore[return-value]

    # -- helpers ------------------------------------------------------------------------------

    def _initialize(self, item: _Item) -> None:
        cfg = self.config
        m, n = item.shape
        g = torch.Generator().manual_seed(_seed(cfg.seed, m, n))
        std = cfg.init_std * float(item.w.std()) if item.w.numel() > 1 else 0.0
        d_r = torch.randn(m, generator=g, dtype=torch.float64) * std
        d_c = torch.randn(n, generator=g, dtype=torch.float64) * std
        if cfg.init == "asvd":
            if item.stats.abs_mean is None:
                item.notes.append("init asvd: mean |x| unavailable in these coordinates (after a non-diagonal "
                                  "scaling); identity init used")
            else:
                d_c = (item.stats.abs_mean.double().cpu().clamp_min(0).pow(cfg.alpha) + 1e-6).log()
        if cfg.train == "rows":
            d_c = torch.zeros_like(d_c)
        elif cfg.train == "cols":
            d_r = torch.zeros_like(d_r)
        item.d_r0, item.d_c0 = d_r.to(item.w.device), d_c.to(item.w.device)

    @staticmethod
    def _transform(item: _Item, d_r: torch.Tensor, d_c: torch.Tensor, notes: list[str],
                   diagnostics: dict[str, float]) -> Transform:
        left = Diagonal(d_r.double().exp()) if bool((d_r != 0).any()) else None
        right = Diagonal(d_c.double().exp()) if bool((d_c != 0).any()) else None
        return Transform(left=left, right=right, notes=[*item.notes, *notes], diagnostics=diagnostics,
                         spectrum_change=_spectrum_change(diagnostics))


def _spectrum_change(diagnostics: dict[str, float]) -> SpectrumChange | None:
    """The report's before/after spectrum measures, from this module's diagnostics (None when the
    matrix was not learned, e.g. without a rank)."""
    if "effective_rank_before" not in diagnostics:
        return None
    return SpectrumChange(diagnostics["effective_rank_before"], diagnostics["effective_rank_after"],
                          diagnostics["participation_ratio_before"], diagnostics["participation_ratio_after"])


def _seed(seed: int, m: int, n: int) -> int:
    """One seed per (config seed, shape): batching cannot change a matrix's draws."""
    return (seed * 1_000_003 + m * 7919 + n) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------
# The optimisation of one group (same shape and rank, or a whole block for the joint block loss)


class _Learner:
    def __init__(self, config: SigmaScaleConfig, items: list[_Item]) -> None:
        self.cfg = config
        self.items = items
        self.device = items[0].w.device
        self.dtype = torch.float32 if config.precision == "float32" else torch.float64
        self.joint = config.objective == "block" and config.block_mode == "joint"
        self._first: torch.Tensor | None = None  # the losses at the initialization (first evaluation)
        # sub-batches of equal shape and rank (one for a layer objective's group)
        keyed: dict[tuple, list[int]] = {}
        for j, it in enumerate(items):
            keyed.setdefault((it.shape, it.rank), []).append(j)
        self.batches = list(keyed.values())

    # -- losses ---------------------------------------------------------------------------------

    def _weights(self, dtype: torch.dtype, d_r: list[torch.Tensor], d_c: list[torch.Tensor],
                 method: str, noise: list[torch.Tensor | None] | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """W' and the scaled spectrum of every item, computed per equal-shape batch."""
        wp: list[torch.Tensor] = [None] * len(self.items)  # type: ignore[list-item]
        sp: list[torch.Tensor] = [None] * len(self.items)  # type: ignore[list-item]
        work = dtype if self.cfg.truncation == "eigh" else None  # float32 Gram + eigh: same final loss (measured)
        for b, idx in enumerate(self.batches):
            w = self._w[dtype][b]
            k = self.items[idx[0]].rank
            out, s = reconstruct(w, torch.stack([d_r[j] for j in idx]), torch.stack([d_c[j] for j in idx]), k,
                                 method, self.cfg.gap_eps, None if noise is None else noise[b], work)
            for pos, j in enumerate(idx):
                wp[j], sp[j] = out[pos], s[pos]
        return wp, sp

    def _layer_loss(self, j: int, wp: torch.Tensor) -> torch.Tensor:
        it = self.items[j]
        m, n = it.shape
        d = self._w_item[wp.dtype][j] - wp
        if self.cfg.loss == "gram":
            c = self._cov[wp.dtype][j]
            return ((d @ c) * d).sum() / (m * n)
        x = self._inputs[wp.dtype][j]
        return (x @ d.mT).pow(2).sum() / (max(x.shape[0], 1) * m * n)

    def _block_params(self, j: int, wp: torch.Tensor) -> dict[str, torch.Tensor]:
        it = self.items[j]
        w = wp
        for t in reversed(it.stats.prior):  # back to the layer's own coordinates
            w = t.undo(w.to(torch.float64))
        ctx = it.stats.block
        module = ctx.block.get_submodule(ctx.local)
        w = w.to(module.weight.dtype)
        return {f"{ctx.local}.weight": lowrank.as_out_in(module, w)}

    def _block_run(self, ctx, params: dict[str, torch.Tensor]) -> torch.Tensor:
        full = {**self._frozen, **params}
        total = 0.0
        for b in self._windows:
            out = ctx.run(b, full)
            target = ctx.targets[b]
            total = total + (out.float() - target.float()).pow(2).mean()
        return total / len(self._windows)

    def losses(self, wp: list[torch.Tensor]) -> torch.Tensor:
        """Raw loss per item (joint block objective: the same block loss repeated)."""
        if self.cfg.objective == "layer":
            return torch.stack([self._layer_loss(j, w) for j, w in enumerate(wp)])
        ctx = self.items[0].stats.block
        if self.joint:
            params: dict[str, torch.Tensor] = {}
            for j, w in enumerate(wp):
                params.update(self._block_params(j, w))
            loss = self._block_run(ctx, params)
            return loss.expand(len(wp))
        return torch.stack([self._block_run(self.items[j].stats.block, self._block_params(j, w))
                            for j, w in enumerate(wp)])

    # -- setup ----------------------------------------------------------------------------------

    def _prepare(self) -> None:
        cfg = self.cfg
        dtypes = {self.dtype, torch.float64}
        self._w = {dt: [torch.stack([self.items[j].w for j in idx]).to(dt) for idx in self.batches] for dt in dtypes}
        self._w_item = {dt: [it.w.to(dt) for it in self.items] for dt in dtypes}
        if cfg.objective == "layer":
            if cfg.loss == "gram":
                self._cov = {dt: [it.stats.covariance.to(self.device, dt) for it in self.items] for dt in dtypes}
            else:
                xs = []
                for it in self.items:
                    x = it.stats.inputs
                    if x is None:
                        raise lowrank.CompressionError("sigmascale loss: activations needs the layer inputs")
                    xs.append(x)
                self._inputs = {dt: [x.to(self.device, dt) for x in xs] for dt in dtypes}
        else:
            ctx = self.items[0].stats.block
            if ctx is None:
                raise lowrank.CompressionError("sigmascale objective: block needs the block context")
            count = len(ctx.inputs.hidden)
            step = max(1, count // min(cfg.block_windows, count))
            self._windows = list(range(0, count, step))[: cfg.block_windows]
            self._frozen = {name: p.detach() for name, p in ctx.block.named_parameters()}

    def _noise(self) -> list[torch.Tensor | None] | None:
        if self.cfg.noise <= 0:
            return None
        out = []
        for b, idx in enumerate(self.batches):
            m, n = self.items[idx[0]].shape
            out.append(torch.randn(m, n, generator=self._gens[b], device=self.device, dtype=self.dtype) * self.cfg.noise)
        return out

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> list[Transform]:
        cfg = self.cfg
        start = time.perf_counter()
        self._prepare()
        n_items = len(self.items)
        with torch.no_grad():
            zeros_r = [torch.zeros(it.shape[0], dtype=torch.float64, device=self.device) for it in self.items]
            zeros_c = [torch.zeros(it.shape[1], dtype=torch.float64, device=self.device) for it in self.items]
            # float64 truth at identity: the normaliser of the objective and the bar to beat
            wp_id, s_id = self._weights(torch.float64, zeros_r, zeros_c, "eigh", None)
            loss_id = self.losses(wp_id).double()
        notes: list[str] = []
        d_r = [it.d_r0.to(self.dtype).clone() for it in self.items]
        d_c = [it.d_c0.to(self.dtype).clone() for it in self.items]
        best_r = [d.clone() for d in d_r]
        best_c = [d.clone() for d in d_c]
        steps_run = 0
        if bool((loss_id > 0).any()) and cfg.steps > 0:
            norm = torch.where(loss_id > 0, loss_id, torch.ones_like(loss_id)).to(self.dtype)
            self._gens = [torch.Generator(device=self.device).manual_seed(_seed(cfg.seed + 1, *self.items[idx[0]].shape))
                          for idx in self.batches]
            phases = ([("rows",), ("cols",)] if cfg.sequential and cfg.train == "both"
                      else [{"both": ("rows", "cols"), "rows": ("rows",), "cols": ("cols",)}[cfg.train]])
            best = [math.inf] * n_items  # on the host
            for phase in phases:
                steps_run += self._phase(phase, d_r, d_c, best_r, best_c, best, norm)
        # final check in float64 without noise: the best iterate (the initialization when nothing
        # was learned; it is also the first iterate) against the identity
        with torch.no_grad():
            learned_r, learned_c = [r.double() for r in best_r], [c.double() for c in best_c]
            wp, s_learned = self._weights(torch.float64, learned_r, learned_c, "eigh", None)
            loss_learned = self.losses(wp).double()
        seconds = (time.perf_counter() - start) / n_items
        first = self._first if self._first is not None else loss_learned
        out = []
        for j, it in enumerate(self.items):
            k = 0 if self.joint else j  # the joint block objective: one loss, one decision for the block
            keep = float(loss_learned[k]) < float(loss_id[k])
            diag = {"loss_start": float(loss_id[j]), "loss_init": float(first[j]),
                    "loss_learned": float(loss_learned[j]) if keep else float(loss_id[j]),
                    "steps": float(steps_run), "seconds": seconds, "rank": float(it.rank)}
            diag.update(spectrum_diagnostics(s_id[j], "_before"))
            diag.update(spectrum_diagnostics(s_learned[j] if keep else s_id[j], "_after"))
            if keep:
                out.append(SigmaScale._transform(it, learned_r[j], learned_c[j], notes, diag))
            else:
                out.append(Transform(notes=[*it.notes, *notes, "learning did not beat the identity; identity kept"],
                                     diagnostics=diag, spectrum_change=_spectrum_change(diag)))
        return out

    def _objective(self, params: list[torch.Tensor], d_r: list[torch.Tensor], d_c: list[torch.Tensor],
                   noise: list[torch.Tensor | None] | None, norm: torch.Tensor, track: Callable) -> torch.Tensor:
        """The normalised objective at the current parameters; ``track`` sees the raw losses first."""
        cfg = self.cfg
        wp, s = self._weights(self.dtype, d_r, d_c, cfg.truncation, noise)
        raw = self.losses(wp)
        track(raw.detach().double())
        obj = raw[0] / norm[0] if self.joint else (raw / norm).sum()
        if cfg.l2 > 0:
            obj = obj + cfg.l2 * sum(p.pow(2).sum() for p in params)
        if cfg.rank_term != "none" and cfg.rank_term_weight > 0:
            term = effective_rank_tensor if cfg.rank_term == "entropy" else participation_ratio_tensor
            obj = obj + cfg.rank_term_weight * sum(term(s[j][: it.rank]) / it.rank for j, it in enumerate(self.items))
        return obj

    def _phase(self, phase: Sequence[str], d_r: list[torch.Tensor], d_c: list[torch.Tensor],
               best_r: list[torch.Tensor], best_c: list[torch.Tensor], best: list[float],
               norm: torch.Tensor) -> int:
        """Optimise the vectors named in ``phase``; returns the number of objective evaluations."""
        cfg = self.cfg
        params = ([*d_r] if "rows" in phase else []) + ([*d_c] if "cols" in phase else [])
        n_items = len(self.items)
        active = torch.ones(n_items, dtype=torch.bool)
        stall = torch.zeros(n_items, dtype=torch.long)
        evaluations = [0]

        def track(values: torch.Tensor) -> None:
            """Keep the best iterate (the parameters the losses were computed at) and the patience."""
            evaluations[0] += 1
            host = values.cpu().tolist()  # one device sync per evaluation
            if self._first is None:
                self._first = torch.tensor(host, dtype=torch.float64)
            for j, v in enumerate(host):
                if not math.isfinite(v):
                    active[j] = False
                    continue
                stall[j] = 0 if v < best[j] * (1 - cfg.min_delta) else stall[j] + 1
                if v < best[j]:
                    best[j] = v
                    best_r[j] = d_r[j].detach().clone()
                    best_c[j] = d_c[j].detach().clone()
                if cfg.patience and stall[j] >= cfg.patience:
                    active[j] = False
            if self.joint:
                active[:] = bool(active.all())

        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                if cfg.optimizer == "lbfgs":
                    self._lbfgs(params, d_r, d_c, norm, track, active)
                else:
                    self._adamw(params, d_r, d_c, norm, track, active)
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return evaluations[0]

    def _adamw(self, params, d_r, d_c, norm, track, active) -> None:
        cfg = self.cfg
        n_items = len(self.items)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.l2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1)) if cfg.schedule == "cosine" else None
        for step in range(cfg.steps + 1):
            last = step == cfg.steps
            obj = self._objective(params, d_r, d_c, None if last else self._noise(), norm, track)
            if last or not bool(active.any()):  # (a non-finite loss deactivates its matrix in track)
                break
            grads = torch.autograd.grad(obj, params, allow_unused=True)
            frozen = [p.detach().clone() for p in params] if not bool(active.all()) else None
            for p, g in zip(params, grads):
                p.grad = torch.zeros_like(p) if g is None else torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            if sched is not None:
                sched.step()
            if frozen is not None:  # matrices that stopped keep their values
                with torch.no_grad():
                    for idx, (p, old) in enumerate(zip(params, frozen)):
                        if not bool(active[idx % n_items]):
                            p.copy_(old)

    def _lbfgs(self, params, d_r, d_c, norm, track, active) -> None:
        """L-BFGS with a strong-Wolfe line search: ~30 evaluations reach AdamW's 1000-step loss."""
        cfg = self.cfg
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max(cfg.steps, 1), max_eval=max(cfg.steps, 1) * 5 // 4 + 1,
                                history_size=20, tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        class _Stop(Exception):
            pass

        def closure():
            if not bool(active.any()):
                raise _Stop
            opt.zero_grad()
            obj = self._objective(params, d_r, d_c, None, norm, track)  # deterministic: no noise
            if not torch.isfinite(obj):
                raise _Stop
            obj.backward()
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            return obj

        try:
            opt.step(closure)
        except _Stop:
            pass


STRATEGIES = [SigmaScale]
