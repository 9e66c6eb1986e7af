"""SoCo (Li et al., arXiv 2502.15092): a learned singular spectrum, trained against the original model.

Each targeted matrix, in the coordinates of its scaling (whitened: W R = U S V^T), becomes
W' = U diag(S * s) V^T R^-1 with one learned scale s_i per component: s_i = 0 prunes it, s_i > 1
amplifies it. Components survive by learned importance, not by singular-value order, and because
every matrix trains under one shared budget the ranks move between layers: a global allocator.

Why this shape (a global allocator with two planning stages):

- Stage 0 of the engine's planner profiles the whitened SVD of every matrix (``refine`` receives
  them as ``context.profiles``); ``refine`` then trains s with the model frozen (``soco_stages``:
  coarse compression, fine-grained sparsification, importance-amplified compensation) and writes
  W' into the model: the kept components with their amplitudes for a compressed matrix, the
  original weight for one kept dense.
- W' has exactly rank k, so the planner's last stage re-profiles it (new whitening statistics,
  since earlier layers changed) and finds k nonzero singular values; ``allocate`` keeps exactly
  that prefix of k, and the compression pass reproduces W' (up to float round-off). Corrections
  of the recipe then run as usual.

Choices where the paper is silent (docs/soco.md). The schedule (``steps``, ``batch_windows``,
``lr``, ``amp_lr``, ``remask_every``) left at null is ``FULL`` on CUDA and the CPU-sized ``CPU``
elsewhere, as aa-svd's schedule is: the full setting's 500 steps of 4 windows would take hours on
a 2-core CPU, the CPU one finishes SmolLM2-135M in minutes and is the one measured there.

- the start (``init``): the paper's s = 1 gives a zero KL gradient and, in a short run, a
  ranking that is mostly the tie-break (measured: worse than zero-sum at every ratio); the
  default places the logits so that the first mask is zero-sum's plan from the first-order loss
  changes on the calibration windows (``soco_init``), and the stages correct it with the KL;
- relaxation: deterministic sigmoid gates in stage 1, the exact hard mask with straight-through
  gradients in stage 2, log-amplitudes in stage 3 (see ``soco_stages``);
- the compression term: exact break-even accounting in value, slope (m + n) in gradient, inside
  an augmented Lagrangian (lambda by dual ascent, fixed quadratic ``ratio_weight``);
- the sparsity term: a polarisation g (1 - g) in stage 2 (an L1 term would only repeat the
  budget's pressure and bias the count; what the hard mask needs is gates at 0 or 1);
- the hard mask: a global threshold on the learned logits, components dropped in ascending order
  with exact accounting until the budget is met, every matrix keeping at least one component,
  ranks above break-even falling back to dense (the original weight);
- the teacher: the original model's top-``topk`` log-probabilities and the rest mass, cached once
  (windows x tokens x (8 topk + 4) bytes), so only one model is ever held;
- the deviation term d of the paper: a k x k matrix D over the kept components, W' = U_k
  (diag(S s) + D) V_k^T R^-1, trained in stage 3 only; off by default (``deviation``): it adds
  k^2 parameters of optimiser state per matrix, fits the few calibration windows, and a dense d
  (the paper's literal form) would break the rank the budget pays for.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field

import lowrank
from lowrank import Budget, MatrixSpectrum, Selection, build_factors

from .soco_stages import SCHEDULE, Outcome, Trainer
from .soco_train import Layout, SpectralLinear, hard_mask, segment_summary, teacher_cache

__all__ = ["CPU", "FULL", "SoCo", "SoCoConfig", "resolved", "spectral_layers", "STRATEGIES"]

#: The full setting, the default on CUDA: steps per stage, windows per step, the learning rates of
#: the logits (stages 1, 2) and of the log-amplitudes (stage 3), the stage-2 re-mask period.
FULL = {"steps": (200, 200, 100), "batch_windows": 4, "lr": 0.05, "amp_lr": 0.01, "remask_every": 10}
#: The CPU-sized setting, the default elsewhere (bench/soco.py's reduced setting: 80 steps of one
#: window, so larger steps and a re-mask every 4).
CPU = {"steps": (16, 24, 40), "batch_windows": 1, "lr": 0.3, "amp_lr": 0.03, "remask_every": 4}


@lowrank.strategy_config
class SoCoConfig:
    """Settings of ``soco``; a schedule setting left at null takes ``FULL`` on CUDA, ``CPU`` elsewhere."""

    steps: tuple[int, int, int] | None = Field(None, description="steps of stages 1, 2, 3 (0 skips a stage; "
                                                                 "null: 200/200/100 on CUDA, 16/24/40 elsewhere)")
    batch_windows: int | None = Field(None, ge=1, description="calibration windows per step (null: 4 on CUDA, 1 elsewhere)")
    lr: float | None = Field(None, gt=0, description="Adam learning rate of the importance logits, stages 1, 2 "
                                                     "(null: 0.05 on CUDA, 0.3 elsewhere)")
    amp_lr: float | None = Field(None, gt=0, description="Adam learning rate of the log-amplitudes, stage 3 "
                                                         "(null: 0.01 on CUDA, 0.03 elsewhere)")
    init: Literal["zero-sum", "first-order", "uniform"] = Field(
        "zero-sum", description="starting logits (soco_init): placed so the first mask is zero-sum's plan from the "
                                "first-order loss changes, or their magnitude per stored parameter (first-order), "
                                "or every gate at init_logit (uniform: the paper's s = 1)")
    init_windows: int = Field(4, ge=1, description="calibration windows of the first-order gradient (init: first-order)")
    spread: float = Field(3.0, gt=0, description="logit range of the placed start: kept gates in (1/2, sigmoid(spread)], "
                                                 "pruned in [sigmoid(-spread), 1/2)")
    init_logit: float = Field(3.0, description="starting logit of every gate with init: uniform (sigmoid(3) = 0.95)")
    ratio_weight: float = Field(5.0, ge=0, description="fixed quadratic weight mu of the budget term")
    warmup: float = Field(0.5, ge=0, le=1, description="stage 1 ramps the budget from dense to the target over "
                                                        "this fraction of its steps")
    dual_lr: float = Field(0.5, ge=0, description="dual ascent step of the budget multiplier lambda")
    sparsity: float = Field(0.5, ge=0, description="polarisation weight in stage 2, in units of the budget term")
    remask_every: int | None = Field(None, ge=1, description="stage 2 re-draws the hard mask every this many steps "
                                                             "(null: 10 on CUDA, 4 elsewhere)")
    amplify: bool = Field(True, description="stage 3 may scale survivors above 1 (off: scales in (0, 1])")
    order: Literal["learned", "spectral"] = Field(
        "learned", description="which components the final mask keeps: by learned importance (published), or "
                               "the same number per matrix by singular value (measured better on the CPU "
                               "setting at 0.4 and 0.6: docs/soco.md)")
    deviation: bool = Field(False, description="also train a k x k deviation D over the kept components (stage 3)")
    deviation_decay: float = Field(0.0, ge=0, description="AdamW weight decay of D")
    topk: int = Field(64, ge=1, description="teacher log-probabilities cached per token (plus the rest mass)")
    seed: int | None = Field(None, description="batch order; None draws it from torch's generator, which "
                                               "lowrank.compress seeds with the recipe's seed")
    progress: bool = Field(True, description="a tqdm bar with stage, step, loss terms and ratio")
    record: str | None = Field(None, description="write sigma, learned logits, mask and scales of every "
                                                 "matrix to this JSON file (for plots)")


def resolved(config: SoCoConfig, device: torch.device) -> SoCoConfig:
    """``config`` with every schedule setting left at null filled in: ``FULL`` on CUDA, ``CPU`` elsewhere."""
    defaults = FULL if device.type == "cuda" else CPU
    return dataclasses.replace(config, **{k: defaults[k] for k in SCHEDULE if getattr(config, k) is None})


def spectral_layers(profiles: dict[str, lowrank.ScaledSVD], model: torch.nn.Module, names: Sequence[str],
                    device: torch.device) -> dict[str, SpectralLinear]:
    """A :class:`SpectralLinear` per matrix from its scaled SVD (A = L^-1 U, B = V^T R^-1, float32).

    The profiles are consumed (popped), so their float64 copies are freed as the layers are built.
    """
    layers = {}
    for name in names:
        svd = profiles.pop(name)
        ones = lowrank.ScaledSVD(svd.u, torch.ones_like(svd.s), svd.vh, svd.transforms)
        a, b = build_factors(ones.to(device), Selection.prefix(svd.s.numel()))
        bias = getattr(model.get_submodule(name), "bias", None)
        layers[name] = SpectralLinear(a.float().contiguous(), b.float().contiguous(), svd.s.float().to(device),
                                      None if bias is None else bias.detach())
        del svd, ones, a, b
    return layers


class SoCo(lowrank.Allocator):
    """SoCo's learned spectrum: three training stages inside ``refine``, then the exact mask's ranks.

    Use it after a whitening-type scaling (the default recipe's). The training needs no gradient
    pass of the engine; it runs the calibration windows itself.
    """

    name = "soco"
    scope = "global"
    Config = SoCoConfig

    # set on the copy that prepare returns (one run's state): the budget of the first allocation,
    # then the learned rank per matrix (None: dense)
    budget: Budget | None = None
    outcome: dict[str, int | None] | None = None

    @property
    def stages(self) -> int:  # type: ignore[override]
        """Two: profile and train (refine), then re-profile the trained weights and keep them."""
        return 2

    def prepare(self, context: lowrank.ModelContext) -> "SoCo":
        """A copy that holds this run's budget and learned ranks."""
        prepared = copy.copy(self)
        prepared.budget, prepared.outcome = None, None
        return prepared

    def allocate(self, spectra: Sequence[MatrixSpectrum], budget: Budget) -> list[Selection]:
        """Before training: a placeholder plan (and the budget is remembered); after: the learned
        rank of every matrix as a prefix of its re-profiled spectrum, or dense."""
        if self.outcome is None:
            self.budget = budget
            # before training (stage 0, or a direct call): the exact mask of the singular values
            # themselves, largest first across matrices; refine does not use this plan.
            layout = Layout(tuple(s.name for s in spectra), tuple(s.shape for s in spectra),
                            tuple(s.full_rank for s in spectra))
            sigma = torch.cat([s.singular_values.double().cpu().clamp_min(1e-300).log() for s in spectra])
            mask = hard_mask(layout, sigma, budget.allowed_params)
            return [Selection.dense() if d else Selection.prefix(k) for k, d in zip(mask.ranks, mask.dense)]
        missing = [s.name for s in spectra if s.name not in self.outcome]
        if missing:
            raise lowrank.CompressionError(f"allocator 'soco': no learned rank for {missing[:3]}")
        ranks = [self.outcome[s.name] for s in spectra]
        return [Selection.dense() if k is None else Selection.prefix(k) for k in ranks]

    def refine(self, context: lowrank.RefineContext, plan: dict[str, Selection]) -> None:
        """Cache the teacher, train the three stages, write W' (or the original weight) into the model."""
        cfg = resolved(self.config, context.device)
        if self.budget is None:
            raise lowrank.CompressionError("allocator 'soco': refine before the first allocation (no budget)")
        names = [t.name for t in context.targets]
        shapes = tuple(t.shape for t in context.targets)
        layout = Layout(tuple(names), shapes, tuple(min(s) for s in shapes))
        allowed = self.budget.allowed_params
        teacher = teacher_cache(context.model, context.calibration, cfg.topk, context.device)
        layers = spectral_layers(context.profiles, context.model, names, context.device)
        context.profiles.clear()
        seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        trainer = Trainer(context.model, layers, layout, teacher, context.calibration, allowed, cfg, seed, context.device)
        from tqdm.auto import tqdm

        with tqdm(total=sum(cfg.steps), desc="soco", disable=not cfg.progress, leave=False) as bar:
            trainer.bar = bar
            outcome = trainer.run()
        del layers
        self._write(context, layout, outcome)
        context.notes.extend(_notes(layout, outcome, teacher.nbytes, allowed))
        context.diagnostics.update(_diagnostics(layout, outcome))
        if cfg.record:
            _record(Path(cfg.record), layout, outcome, trainer)

    def _write(self, context: lowrank.RefineContext, layout: Layout, outcome: Outcome) -> None:
        """W' into every compressed matrix, the teacher into every dense one; remember the ranks."""
        ranks: dict[str, int | None] = {}
        for name, rank, dense in zip(layout.names, outcome.mask.ranks, outcome.mask.dense):
            if dense:
                context.set_weight(name, context.teacher[name])
                ranks[name] = None
            else:
                context.set_weight(name, outcome.layers[name].dense_weight())
                ranks[name] = rank
        self.outcome = ranks


def _notes(layout: Layout, outcome: Outcome, teacher_bytes: int, allowed: int) -> list[str]:
    """Report lines: per stage, the mask summary, the learned scales."""
    dense_total = layout.dense_params
    lines = [f"soco stage {g.stage}: {g.steps} steps, objective {g.objective_first:.4f} -> {g.objective_last:.4f}, "
             f"KL {g.kl_last:.4f}, ratio {g.ratio:.4f}, {g.seconds:.1f}s" for g in outcome.logs]
    keep = layout.split(outcome.mask.keep)
    moved = sum(int((~k[:r]).sum()) for k, r, d in zip(keep, outcome.mask.ranks, outcome.mask.dense) if not d)
    kept_scales = [float(v) for v, k in zip(outcome.scale.tolist(), outcome.mask.keep.tolist()) if k and v != 1.0]
    lines.append(f"soco mask: {sum(outcome.mask.dense)} of {len(layout.names)} matrices dense, stored "
                 f"{outcome.mask.params:,} of {allowed:,} allowed ({1 - outcome.mask.params / dense_total:.4f} removed); "
                 f"{moved} kept components lie outside their matrix's singular-value prefix")
    lines.append(f"soco scales of the survivors (min/mean/max): {segment_summary(kept_scales)}; teacher cache "
                 f"{teacher_bytes / 2**20:.1f} MiB")
    return lines


def _diagnostics(layout: Layout, outcome: Outcome) -> dict[str, dict[str, float]]:
    """Per matrix, for the report and ``lowrank inspect``: what SoCo kept and how it rescaled it.

    ``outside_prefix``: kept components below a pruned one in singular-value order (0 is plain
    truncation); ``order_agreement``: Spearman correlation of the learned importance with the
    singular-value order (1: SoCo ranked exactly as the spectrum does); ``scale_*``: the learned
    amplitudes of the survivors (1 without stage 3).
    """
    columns = [layout.split(x) for x in (outcome.importance, outcome.mask.keep, outcome.scale)]
    out: dict[str, dict[str, float]] = {}
    for j, name in enumerate(layout.names):
        importance, keep, scale = (c[j] for c in columns)
        rank = outcome.mask.ranks[j]
        values = {"dense": float(outcome.mask.dense[j]), "learned_rank": float(rank)}
        n = importance.numel()
        if n > 1:
            position = torch.empty(n)
            position[importance.argsort(descending=True)] = torch.arange(n, dtype=torch.float32)
            values["order_agreement"] = float(torch.corrcoef(torch.stack([position, torch.arange(n).float()]))[0, 1])
        if not outcome.mask.dense[j]:
            values["outside_prefix"] = float((~keep[:rank]).sum())
            kept = scale[keep]
            values.update(scale_min=float(kept.min()), scale_mean=float(kept.mean()), scale_max=float(kept.max()))
        out[name] = values
    return out


def _record(path: Path, layout: Layout, outcome: Outcome, trainer: Trainer) -> None:
    """Per matrix: sigma, learned logit, mask and scale (the data of an importance-vs-order plot)."""
    sigma = torch.cat([layer.sigma.cpu() for layer in trainer.layers.values()])
    columns = [layout.split(x) for x in (sigma, outcome.importance, outcome.mask.keep, outcome.scale)]
    matrices = {}
    for j, name in enumerate(layout.names):
        matrices[name] = {"shape": list(layout.shapes[j]), "dense": outcome.mask.dense[j],
                          "sigma": columns[0][j].tolist(), "importance": columns[1][j].tolist(),
                          "mask": columns[2][j].tolist(), "scale": columns[3][j].tolist()}
    stages = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(g).items()}
              for g in outcome.logs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"matrices": matrices, "stages": stages, "params": outcome.mask.params}))


STRATEGIES = [SoCo]
