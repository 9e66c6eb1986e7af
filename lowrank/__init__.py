"""lowrank: compress LLM linear layers by truncated SVD after an activation-aware change of basis.

The public API, for two audiences. Users::

    import lowrank
    from lowrank.data import load_model, load_windows

    model, tokenizer = load_model("smollm2-135m")
    calibration = load_windows(tokenizer, "austen:emma", "calibration", 32, 512, seed=3)
    recipe = lowrank.Recipe(scalings=["whitening"], allocator="uniform", ratio=0.2)
    report = lowrank.compress(model, recipe, calibration)   # in place
    lowrank.save(model, "out/", tokenizer=tokenizer)
    model = lowrank.load("out/")

Plugin authors: ``hookimpl``, ``Strategy`` and ``strategy_config``, the four bases (``Scaling``,
``Allocator``, ``Correction``, ``Exporter``) and every type their methods receive or return.

Names are imported lazily, so ``import lowrank`` does not import torch or transformers until a name
is used; the ``TYPE_CHECKING`` block below lists every one of them for type checkers. Test-bed
helpers (bundled models, texts, windows, perplexity) live in :mod:`lowrank.data`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._contract.hookspecs import hookimpl
from ._formats.hook import install_transformers_hook
from ._version import __version__

# name -> module that defines it (relative to this package); each name once
_EXPORTS = {
    # errors
    "LowrankError": "_contract.errors", "RegistryError": "_contract.errors",
    "RecipeError": "_contract.errors", "CompressionError": "_contract.errors",
    # users: recipes, compression, checkpoints, reports, inspection, the registry
    "Recipe": "_contract.recipe",
    "compress": "_engine.compress", "resolve_device": "_engine.device",
    "save": "_formats.io", "load": "_formats.io",
    "LowRankLinear": "_contract.layers",
    "CompressionReport": "_contract.report", "MatrixReport": "_contract.report",
    "inspect_model": "_engine.inspect", "plot_inspection": "_engine.inspect", "MatrixInfo": "_engine.inspect",
    "get_registry": "_contract.registry", "reset_registry": "_contract.registry",
    "new_manager": "_contract.registry", "Registry": "_contract.registry", "PluginEntry": "_contract.registry",
    # plugin authors: strategies and their bases
    "Strategy": "_contract.strategy", "strategy_config": "_contract.strategy",
    "Scaling": "_contract.scaling", "Allocator": "_contract.allocator", "ComponentScorer": "_contract.allocator",
    "Correction": "_contract.correction", "BlockCorrectionContext": "_contract.correction",
    "Exporter": "_contract.exporter", "atomic_directory": "_contract.exporter",
    "check_output_directory": "_contract.exporter",
    # plugin authors: what scalings work with
    "LayerStats": "_contract.stats", "STATISTICS": "_contract.stats",
    "Operator": "_contract.operators", "Diagonal": "_contract.operators", "Triangular": "_contract.operators",
    "Dense": "_contract.operators", "Transform": "_contract.operators", "SpectrumChange": "_contract.operators",
    "BlockContext": "_contract.blocks", "BlockInputs": "_contract.blocks",
    # plugin authors: what allocators work with
    "MatrixSpectrum": "_contract.spectrum", "Selection": "_contract.spectrum", "Budget": "_contract.spectrum",
    "ScaledSVD": "_contract.factors", "build_factors": "_contract.factors",
    "scaled_gradient": "_contract.factors", "activation_error": "_contract.factors",
    "scaled_svd": "_engine.factorize",
    "ModelContext": "_contract.context", "RefineContext": "_contract.context",
    "GradientPassInfo": "_contract.context", "Probe": "_contract.context",
    # parameter accounting
    "factored_params": "_contract.accounting", "breakeven_rank": "_contract.accounting",
    "stored_params": "_contract.accounting", "uniform_rank": "_contract.accounting",
    "floor_tolerant": "_contract.accounting",
    # model helpers
    "Target": "_contract.model", "weight_of": "_contract.model", "set_weight_of": "_contract.model",
    "as_out_in": "_contract.model",
    "is_linear": "_contract.model", "count_parameters": "_contract.model", "max_positions": "_contract.model",
    "find_blocks": "_engine.discovery", "find_targets": "_engine.discovery",
    # spectra and the cache
    "effective_rank": "_contract.diagnostics", "participation_ratio": "_contract.diagnostics",
    "effective_rank_tensor": "_contract.diagnostics", "participation_ratio_tensor": "_contract.diagnostics",
    "spectrum_diagnostics": "_contract.diagnostics",
    "cache_dir": "_contract.cache",
}

__all__ = ["hookimpl", "install_transformers_hook", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowrank' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


install_transformers_hook()  # from_pretrained reads lowrank checkpoints (see _formats/hook.py)

if TYPE_CHECKING:  # pragma: no cover
    from ._contract.accounting import breakeven_rank, factored_params, floor_tolerant, stored_params, uniform_rank
    from ._contract.allocator import Allocator, ComponentScorer
    from ._contract.blocks import BlockContext, BlockInputs
    from ._contract.cache import cache_dir
    from ._contract.context import GradientPassInfo, ModelContext, Probe, RefineContext
    from ._contract.correction import BlockCorrectionContext, Correction
    from ._contract.diagnostics import (effective_rank, effective_rank_tensor, participation_ratio,
                                        participation_ratio_tensor, spectrum_diagnostics)
    from ._contract.errors import CompressionError, LowrankError, RecipeError, RegistryError
    from ._contract.exporter import Exporter, atomic_directory, check_output_directory
    from ._contract.factors import ScaledSVD, activation_error, build_factors, scaled_gradient
    from ._contract.layers import LowRankLinear
    from ._contract.model import Target, as_out_in, count_parameters, is_linear, max_positions, set_weight_of, weight_of
    from ._contract.operators import Dense, Diagonal, Operator, SpectrumChange, Transform, Triangular
    from ._contract.recipe import Recipe
    from ._contract.registry import PluginEntry, Registry, get_registry, new_manager, reset_registry
    from ._contract.report import CompressionReport, MatrixReport
    from ._contract.scaling import Scaling
    from ._contract.spectrum import Budget, MatrixSpectrum, Selection
    from ._contract.stats import STATISTICS, LayerStats
    from ._contract.strategy import Strategy, strategy_config
    from ._engine.compress import compress
    from ._engine.device import resolve_device
    from ._engine.discovery import find_blocks, find_targets
    from ._engine.factorize import scaled_svd
    from ._engine.inspect import MatrixInfo, inspect_model, plot_inspection
    from ._formats.io import load, save
