"""ASVD's sensitivity-based truncation rank search (STRS), as SigmaScale uses it (Yuan et al., 2023).

``prepare``: for every targeted matrix and every candidate fraction kept p, replace that matrix
alone by its plain truncated SVD at rank floor(m n p / (m + n)), measure the perplexity on (a
subsample of) the calibration windows, and restore the weight bit for bit. The table is cached on
disk under the lowrank cache directory, keyed by a fingerprint of the model's weights, the windows
and the candidates, so re-running a recipe does not pay for it again.

``allocate``: sort every (matrix, p, ppl) by perplexity, descending; a cut index c splits the list;
each matrix keeps the smallest fraction among its entries past the cut (the least harmful ones),
a matrix without such an entry stays dense. The cut is binary-searched as the least compression
whose stored parameters fit the budget (ASVD's search, made to never exceed the budget).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import warnings
from typing import Sequence

import torch
from pydantic import Field

import lowrank
from lowrank import Budget, MatrixSpectrum, Selection, stored_params, uniform_rank

__all__ = ["Sensitivity", "SensitivityConfig", "sensitivity_rank", "cut_allocation"]

CACHE_VERSION = 1


def sensitivity_rank(shape: tuple[int, int], kept: float) -> int:
    """k = floor(m n p / (m + n)): the factors hold about the fraction p of the matrix's parameters."""
    return uniform_rank(shape, 1.0 - kept)


@lowrank.strategy_config
class SensitivityConfig:
    candidates: tuple[float, ...] = Field(
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        description="fractions of each matrix's parameters kept that are measured (ASVD: 0.1..0.9)")
    windows: int = Field(4, ge=1, le=100_000, description="calibration windows used for each perplexity (evenly spaced)")
    tokens: int | None = Field(None, ge=2, description="tokens per window (None: the calibration length)")
    batch_size: int = Field(8, ge=1, le=1024, description="windows per forward pass")
    cache: bool = Field(True, description="read/write the table under the lowrank cache directory")
    progress: bool = Field(True, description="show a progress bar")

    def __post_init__(self) -> None:
        if not self.candidates or any(not 0.0 < p < 1.0 for p in self.candidates):
            raise ValueError("candidates must be fractions in (0, 1)")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates must be distinct")


def _fingerprint(context, windows: torch.Tensor, cfg: SensitivityConfig) -> str:
    """Hash of the model's parameters (large tensors: a strided sample and the sum), the windows,
    the targets and the candidates."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{sorted(cfg.candidates)}|{cfg.tokens}".encode())
    for name, p in sorted(context.model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().reshape(-1)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        if t.numel() > 4_000_000:
            step = t.numel() // 1_000_003 + 1
            h.update(f"{float(t.double().sum()):.17g}".encode())
            t = t[::step]
        h.update(t.float().cpu().numpy().tobytes())
    h.update("|".join(f"{t.name}:{t.shape}" for t in context.targets).encode())
    h.update(windows.cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _cache_path(key: str):
    return lowrank.cache_dir() / "sensitivity" / f"{key}.json"


def cut_allocation(entries: Sequence[tuple[str, float, float]], shapes: dict[str, tuple[int, int]],
                   allowed: int) -> dict[str, float] | None:
    """ASVD's search: the kept fraction per matrix (1.0 = dense) for the least compression that fits.

    ``entries`` are (matrix, kept fraction, perplexity). Sorted by perplexity descending, the entries
    from the cut index on are "cheap"; each matrix keeps its smallest cheap fraction. Returns None
    when even the most compressed allocation does not fit.
    """
    ordered = sorted(entries, key=lambda e: -e[2] if math.isfinite(e[2]) else -math.inf)

    def fractions(cut: int) -> dict[str, float]:
        out = {name: 1.0 for name in shapes}
        for name, p, _ in ordered[cut:]:
            out[name] = min(out[name], p)
        return out

    def params(fr: dict[str, float]) -> int:
        return sum(stored_params(*shapes[n], None if p >= 1.0 else sensitivity_rank(shapes[n], p)) for n, p in fr.items())

    if params(fractions(0)) > allowed:
        return None
    lo, hi = 0, len(ordered)  # params(fractions(c)) is non-decreasing in c; fractions(lo) fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if params(fractions(mid)) <= allowed:
            lo = mid
        else:
            hi = mid - 1
    return fractions(lo)


class Sensitivity(lowrank.Allocator):
    """ASVD's sensitivity-based rank search: per-matrix perplexity of plain SVD at each kept fraction."""

    name = "sensitivity"
    Config = SensitivityConfig
    scope = "global"

    @property
    def needs_whole_model(self) -> bool:  # a perplexity of the whole model per matrix and fraction
        return True

    #: per matrix, kept fraction -> perplexity; filled on the copy ``prepare`` returns
    table: dict[str, dict[float, float]] = {}
    base_perplexity: float | None = None

    # -- measuring ------------------------------------------------------------------------------

    def _windows(self, calibration: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        count = calibration.shape[0]
        take = min(cfg.windows, count)
        idx = torch.linspace(0, count - 1, take).round().long().unique()
        w = calibration[idx]
        if cfg.tokens is not None:
            w = w[:, : cfg.tokens]
        return w

    def prepare(self, context: lowrank.ModelContext) -> "Sensitivity":
        prepared = copy.copy(self)
        prepared._fill(context)
        return prepared

    def _fill(self, context: lowrank.ModelContext) -> None:
        cfg = self.config
        windows = self._windows(context.calibration)
        key = _fingerprint(context, windows, cfg)
        path = _cache_path(key)
        if cfg.cache and path.is_file():
            try:
                data = json.loads(path.read_text())
                self.table = {n: {float(p): float(v) for p, v in row.items()} for n, row in data["table"].items()}
                self.base_perplexity = float(data["base"])
                if all(t.name in self.table for t in context.targets):
                    context.notes.append(f"sensitivity: table read from the cache ({path.name})")
                    return
            except (OSError, ValueError, KeyError):
                pass
        model = context.model
        home = next(model.parameters()).device
        if home != context.device:
            model.to(context.device)
        try:
            self.table, self.base_perplexity = self._measure(context, windows)
        finally:
            if home != context.device:
                model.to(home)
        if cfg.cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"version": CACHE_VERSION, "base": self.base_perplexity,
                                           "windows": list(windows.shape), "candidates": list(cfg.candidates),
                                           "table": {n: {repr(p): v for p, v in row.items()} for n, row in self.table.items()}}))
                tmp.replace(path)
            except OSError as err:
                context.notes.append(f"sensitivity: could not write the cache ({err})")
        context.notes.append(f"sensitivity: measured {len(self.table)} matrices x {len(cfg.candidates)} fractions "
                             f"on {windows.shape[0]}x{windows.shape[1]} calibration tokens")

    @torch.no_grad()
    def _measure(self, context, windows: torch.Tensor) -> tuple[dict[str, dict[float, float]], float]:
        from tqdm.auto import tqdm

        cfg = self.config

        def ppl() -> float:
            nll = context.loss(windows, batch_size=cfg.batch_size)
            try:
                value = math.exp(nll)
            except OverflowError:
                return math.inf
            return value if math.isfinite(value) else math.inf

        base = ppl()
        table: dict[str, dict[float, float]] = {}
        bar = tqdm(total=len(context.targets) * len(cfg.candidates), desc="lowrank: sensitivity", unit="svd",
                   disable=not cfg.progress, file=sys.stderr, leave=False)
        try:
            for t in context.targets:
                module = context.module(t.name)
                original = module.weight.detach().clone()
                w = context.weight(t.name).to(context.device)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                row: dict[float, float] = {}
                try:
                    for p in cfg.candidates:
                        k = sensitivity_rank(t.shape, p)
                        context.set_weight(t.name, (u[:, :k] * s[:k]) @ vh[:k])
                        row[float(p)] = ppl()
                        bar.update(1)
                finally:
                    module.weight.copy_(original)  # bit for bit
                table[t.name] = row
        finally:
            bar.close()
        return table, base

    # -- allocating -----------------------------------------------------------------------------

    def allocate(self, spectra: Sequence[MatrixSpectrum], budget: Budget) -> list[Selection]:
        missing = [s.name for s in spectra if s.name not in self.table]
        if missing:
            raise lowrank.CompressionError(
                f"allocator 'sensitivity' has no measurement for {missing[0]!r} (and {len(missing) - 1} more): "
                "prepare() must run on the same model and targets first")
        shapes = {s.name: s.shape for s in spectra}
        entries = [(s.name, p, v) for s in spectra for p, v in self.table[s.name].items()]
        chosen = cut_allocation(entries, shapes, budget.allowed_params)
        if chosen is None:
            # even every matrix at its smallest candidate keeps too much: remove the same fraction
            # of every matrix (the uniform rule), which always fits
            warnings.warn("sensitivity: the budget is below the smallest candidate fraction; "
                          "uniform ranks used", stacklevel=2)
            return [Selection.prefix(sensitivity_rank(s.shape, 1.0 - budget.ratio)) for s in spectra]
        out = []
        for s in spectra:
            p = chosen[s.name]
            out.append(Selection.dense() if p >= 1.0 else Selection.prefix(sensitivity_rank(s.shape, p)))
        return out


STRATEGIES = [Sensitivity]
