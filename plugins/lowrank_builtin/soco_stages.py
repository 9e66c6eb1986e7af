"""SoCo's three training stages on the reparametrised model (the model itself stays frozen).

1. **Coarse compression.** Soft gates s_i = sigmoid(theta_i) (theta starts at ``init_logit``,
   s ~ 0.95) on every component; objective KL + lambda e + mu e^2 with e = (P(s) - allowed) / dense
   and P the exact expected stored parameters (``soft_params``). mu (``ratio_weight``) is fixed;
   lambda follows dual ascent, lambda += ``dual_lr`` x e each step (the augmented Lagrangian of
   CoFi pruning, Xia et al. 2022), so the budget is approached fast without tuning the penalty to
   the size of the KL.
2. **Fine-grained sparsification.** The forward pass uses the hard mask (``hard_mask``: exact
   budget, dense fallback) of the current theta, re-drawn every ``remask_every`` steps: the
   alternating refinement of which components survive. Gradients reach theta straight through
   (s = mask + g - g.detach()): a pruned component whose return would lower the KL rises, a kept
   one that does not matter sinks. The same Lagrangian keeps the soft count on the budget, and a
   polarisation term ``sparsity`` x sum_i c_i g_i (1 - g_i) (c_i = (m + n) / dense, the unit of
   the ratio term) pushes the gates to 0 or 1, so that soft and hard masks agree.
3. **Importance-amplified compensation.** The final hard mask is fixed; each surviving
   component of a compressed matrix gets an amplitude exp(rho_i) (rho = 0 at the start, so the
   stage starts from the truncation), trained on the KL alone. Amplification is free
   (``amplify``: off clips rho at 0, i.e. scales in (0, 1]); a matrix kept dense stays the
   original. With ``deviation`` a k x k deviation D over the kept components is trained too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .soco_init import warm_start
from .soco_train import (
    HardMask,
    Layout,
    SpectralLinear,
    TeacherCache,
    hard_mask,
    soft_params,
    swapped,
    topk_kl,
)

if TYPE_CHECKING:
    from .soco import SoCoConfig

__all__ = ["SCHEDULE", "StageLog", "Terms", "Outcome", "Trainer"]

#: The settings of the training schedule; null in a config until ``soco.resolved`` fills them per device.
SCHEDULE = ("steps", "batch_windows", "lr", "amp_lr", "remask_every")


@dataclass
class StageLog:
    """What one stage did.

    Attributes:
        stage: 1, 2 or 3.
        steps: Steps run.
        objective_first: The stage objective at its first step.
        objective_last: The stage objective at its last step.
        kl_last: KL at the last step.
        ratio: Fraction removed at the end (expected for stage 1, the hard mask's after).
        seconds: Wall time.
    """

    stage: int
    steps: int
    objective_first: float = float("nan")
    objective_last: float = float("nan")
    kl_last: float = float("nan")
    ratio: float = float("nan")
    seconds: float = 0.0


@dataclass
class Terms:
    """The loss terms of one step (tensors with gradients).

    Attributes:
        kl: KL(teacher || student).
        ratio: Lagrangian compression term.
        sparse: Polarisation term.
        e: (expected stored - allowed) / dense, detached.
    """

    kl: torch.Tensor
    ratio: torch.Tensor
    sparse: torch.Tensor
    e: float

    @property
    def total(self) -> torch.Tensor:
        """The objective."""
        return self.kl + self.ratio + self.sparse


@dataclass
class Outcome:
    """The result of training.

    Attributes:
        mask: The final hard mask.
        importance: The learned logits theta (flat, after stage 2).
        scale: The final s per component (0 pruned, 1 in dense matrices, the amplitude else).
        layers: The trained layers of the compressed matrices (kept components only).
        logs: One per stage.
    """

    mask: HardMask
    importance: torch.Tensor
    scale: torch.Tensor
    layers: dict[str, SpectralLinear]
    logs: list[StageLog] = field(default_factory=list)


class Trainer:
    """Runs the three stages; holds theta, lambda and the batch order (seeded)."""

    def __init__(self, model: nn.Module, layers: dict[str, SpectralLinear], layout: Layout, teacher: TeacherCache,
                 windows: torch.Tensor, allowed: int, config: "SoCoConfig", seed: int, device: torch.device) -> None:
        self.model, self.layers, self.layout, self.teacher = model, layers, layout, teacher
        unset = [k for k in SCHEDULE if getattr(config, k) is None]
        if unset:
            raise ValueError(f"soco Trainer: schedule settings {unset} are null; pass soco.resolved(config, device)")
        self.windows, self.allowed, self.cfg, self.device = windows, allowed, config, device
        total = layout.offsets[-1]
        self.theta = torch.full((total,), float(config.init_logit), device=device, requires_grad=True)
        cost = torch.tensor([m + n for m, n in layout.shapes], dtype=torch.float32, device=device)
        self.cost = cost[layout.owner(device)] / layout.dense_params
        self.lam = 0.0
        self.target = float(allowed)   # the budget of the current step (stage 1 ramps it down)
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []
        self.bar: Any = None
        self.best: HardMask | None = None   # stage 2's best mask
        self.start: HardMask | None = None  # the warm start's mask (init: first-order)
        # stage 2 judges its masks on the same windows every time (a fixed held-out draw): KL
        # differs more between windows than between neighbouring masks
        self.validation = torch.randperm(windows.shape[0], generator=self.generator)[:config.batch_windows].sort().values

    def batch(self) -> torch.Tensor:
        """The next ``batch_windows`` calibration windows (a seeded permutation, epoch by epoch)."""
        n = self.windows.shape[0]
        take = []
        while len(take) < min(self.cfg.batch_windows, n):
            if not self._order:
                self._order = torch.randperm(n, generator=self.generator).tolist()
            take.append(self._order.pop())
        return torch.tensor(sorted(take))

    def kl(self, idx: torch.Tensor) -> torch.Tensor:
        """KL of the model as it is now (layers swapped in) on windows ``idx``."""
        t, dev = self.teacher, self.device
        logits = self.model(self.windows[idx].to(dev), use_cache=False).logits
        return topk_kl(logits, t.logp[idx].to(dev), t.index[idx].to(dev), t.log_rest[idx].to(dev))

    def set_scales(self, flat: torch.Tensor) -> None:
        """Hand every layer its slice of the per-component scales."""
        for layer, s in zip(self.layers.values(), self.layout.split(flat)):
            layer.scale = s

    def mask(self) -> HardMask:
        """The hard mask of the current importance."""
        return hard_mask(self.layout, self.theta.detach(), self.allowed)

    def terms(self, stage: int, idx: torch.Tensor, mask: HardMask | None) -> Terms:
        """Stage 1 or 2's loss terms on windows ``idx`` (stage 2 runs the hard ``mask``)."""
        g = torch.sigmoid(self.theta)
        s = g if mask is None else mask.keep.to(g.device, g.dtype) + g - g.detach()
        self.set_scales(s)
        e = (soft_params(self.layout, g) - self.target) / self.layout.dense_params
        ratio = self.lam * e + self.cfg.ratio_weight * e * e
        weight = self.cfg.sparsity if stage == 2 else 0.0
        sparse = weight * (self.cost * g * (1 - g)).sum()
        return Terms(self.kl(idx), ratio, sparse, float(e.detach()))

    def _show(self, stage: int, t: Terms | None, kl: float, ratio: float) -> None:
        if self.bar is None:
            return
        post = {"stage": stage, "kl": f"{kl:.4f}", "ratio": f"{ratio:.4f}"}
        if t is not None:
            post.update(lag=f"{float(t.ratio.detach()):.2e}", sparse=f"{float(t.sparse.detach()):.2e}",
                        lam=f"{self.lam:.3g}")
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def relax(self, stage: int, steps: int) -> StageLog:
        """Stage 1 (soft gates) or stage 2 (hard mask, straight through): train theta.

        Stage 2 alternates: the mask is re-drawn every ``remask_every`` steps, and each new mask is
        judged by its KL on the fixed validation windows; the best (the warm start's mask
        included) is the one it hands on (``self.best``), so the stage never returns a worse mask,
        on those windows, than the one it started from.
        """
        log, start = StageLog(stage, steps), time.perf_counter()
        opt = torch.optim.Adam([self.theta], lr=self.cfg.lr, betas=(0.5, 0.99))
        mask = None
        if stage == 2 and steps:
            if self.start is not None:
                self._settle(log, self.start)
            mask = self.mask()
            self._settle(log, mask)
        dense, ramp = self.layout.dense_params, max(1.0, self.cfg.warmup * steps)
        for step in range(steps):
            # stage 1 ramps the budget from dense to the target over its first ``warmup`` part
            # (CoFi's warm-up), so the multiplier does not wind up while the count is still flat
            # (after a warm start the gates already sit at the budget: no ramp)
            ramped = stage == 1 and self.start is None
            self.target = dense - (dense - self.allowed) * min(1.0, (step + 1) / ramp) if ramped else self.allowed
            if mask is not None and step and step % self.cfg.remask_every == 0:
                mask = self.mask()
                self._settle(log, mask)
            t = self.terms(stage, self.batch(), mask)
            opt.zero_grad(set_to_none=True)
            t.total.backward()
            opt.step()
            # dual ascent on the budget constraint; lambda >= 0 (over-compression is pulled back by
            # the quadratic term alone, so the multiplier never pushes the count away from the budget)
            self.lam = max(0.0, self.lam + self.cfg.dual_lr * t.e)
            kl, total = float(t.kl.detach()), float(t.total.detach())
            achieved = 1 - (mask.params if mask is not None else self.target + t.e * dense) / dense
            if stage == 1:
                log.objective_first = total if step == 0 else log.objective_first
                log.objective_last = total
            log.kl_last, log.ratio = kl, achieved
            self._show(stage, t, kl, achieved)
        if mask is not None:
            mask = self.mask()
            self._settle(log, mask)
        log.seconds = time.perf_counter() - start
        return log

    @torch.no_grad()
    def judge(self, mask: HardMask) -> float:
        """KL of the hard ``mask`` (plain gates) on the fixed validation windows."""
        self.set_scales(mask.keep.to(self.device, torch.float32))
        return float(self.kl(self.validation))

    def _settle(self, log: StageLog, mask: HardMask) -> None:
        """Judge a stage-2 mask; keep it if its validation KL is the best so far (stage 2's objective
        is the KL of the exact-budget hard mask; the soft terms only steer). A mask equal to the
        best one is not judged again."""
        if self.best is not None and torch.equal(self.best.keep, mask.keep):
            return
        kl = self.judge(mask)
        if math.isnan(log.objective_first):
            log.objective_first = kl
        if self.best is None or math.isnan(log.objective_last) or kl < log.objective_last:
            self.best, log.objective_last = mask, kl

    def final_mask(self) -> HardMask:
        """The hard mask of the learned importance; with ``order: spectral`` each compressed matrix
        keeps the same number of components, but its largest singular values."""
        mask = self.best if self.best is not None else self.mask()
        if self.cfg.order == "spectral":
            keep = mask.keep.clone()
            offsets = self.layout.offsets
            for j, (rank, dense) in enumerate(zip(mask.ranks, mask.dense)):
                if not dense:
                    keep[offsets[j]:offsets[j + 1]] = torch.arange(self.layout.ranks[j]) < rank
            mask = HardMask(keep, mask.ranks, mask.dense, mask.params)
        return mask

    def compensate(self, mask: HardMask, steps: int) -> tuple[dict[str, SpectralLinear], StageLog, torch.Tensor]:
        """Stage 3: the mask fixed, amplitudes (and the optional deviation) trained on the KL.

        Long because it builds the restricted layers, runs the loop and assembles the final scales.
        """
        log, start = StageLog(3, steps), time.perf_counter()
        keep = self.layout.split(mask.keep.to(self.device))
        restricted = {name: layer.restricted(k) for (name, layer), k, dense
                      in zip(self.layers.items(), keep, mask.dense) if not dense}
        sizes = [layer.sigma.numel() for layer in restricted.values()]
        rho = torch.zeros(sum(sizes), device=self.device, requires_grad=True)
        groups: list[dict[str, Any]] = [{"params": [rho], "lr": self.cfg.amp_lr}]
        if self.cfg.deviation:
            for layer, k in zip(restricted.values(), sizes):
                layer.core = torch.zeros(k, k, device=self.device, requires_grad=True)
            groups.append({"params": [r.core for r in restricted.values()], "lr": self.cfg.amp_lr,
                           "weight_decay": self.cfg.deviation_decay})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        achieved = 1 - mask.params / self.layout.dense_params
        with swapped(self.model, dict(restricted)):
            for step in range(steps):
                for layer, r in zip(restricted.values(), torch.split(rho, sizes)):
                    layer.scale = r.exp()
                kl = self.kl(self.batch())
                opt.zero_grad(set_to_none=True)
                kl.backward()
                opt.step()
                if not self.cfg.amplify:
                    with torch.no_grad():
                        rho.clamp_(max=0.0)   # projected: scales stay in (0, 1]
                value = float(kl.detach())
                log.objective_first = value if step == 0 else log.objective_first
                log.objective_last = log.kl_last = value
                log.ratio = achieved
                self._show(3, None, value, achieved)
        with torch.no_grad():
            for layer, r in zip(restricted.values(), torch.split(rho.detach(), sizes)):
                layer.scale = r.exp()
                layer.core = None if layer.core is None else layer.core.detach()
            scale = mask.keep.to(self.device, torch.float32).clone()
            flat_keep = mask.keep.to(self.device)
            compressed = torch.cat([k & ~torch.tensor(d, device=self.device) for k, d in
                                    zip(self.layout.split(flat_keep), mask.dense)])
            scale[compressed] = rho.detach().exp()
        log.seconds = time.perf_counter() - start
        return restricted, log, scale

    def run(self) -> Outcome:
        """All three stages (a stage with 0 steps is skipped); the model is unchanged afterwards."""
        steps = self.cfg.steps
        flags = {p: p.requires_grad for p in self.model.parameters()}
        for p in flags:
            p.requires_grad_(False)
        try:
            with swapped(self.model, dict(self.layers)):
                if self.cfg.init != "uniform":
                    self.start = warm_start(self, self.cfg.init, self.cfg.init_windows, self.cfg.spread)
                logs = [self.relax(1, steps[0]), self.relax(2, steps[1])]
            mask = self.final_mask()
            layers, log3, scale = self.compensate(mask, steps[2])
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        return Outcome(mask, self.theta.detach().cpu(), scale.cpu(), layers, [*logs, log3])
