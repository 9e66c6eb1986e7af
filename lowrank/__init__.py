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

# module (relative to this package) -> the public names it defines; each name once
_EXPORTS: dict[str, tuple[str, ...]] = {
    "_contract.errors": ("LowrankError", "RegistryError", "RecipeError", "CompressionError", "CheckpointError",
                         "DeviceError",),
    "_contract.recipe": ("Recipe",),
    "_contract.presets": ("Preset",),
    "_engine.compress": ("compress",),
    "_engine.stream": ("compress_checkpoint",),
    "_engine.device": ("resolve_device",),
    "_engine.setup": ("preflight",),
    "_formats.io": ("save", "load",),
    "_contract.layers": ("LowRankLinear",),
    "_contract.report": ("CompressionReport", "MatrixReport",),
    "_engine.inspect": ("inspect_model", "plot_inspection", "MatrixInfo",),
    "_contract.registry": ("get_registry", "reset_registry", "new_manager", "Registry", "PluginEntry",),
    "_contract.strategy": ("Strategy", "strategy_config",),
    "_contract.scaling": ("Scaling",),
    "_contract.allocator": ("Allocator", "ComponentScorer",),
    "_contract.correction": ("Correction", "BlockCorrectionContext",),
    "_contract.exporter": ("Exporter", "atomic_directory", "check_output_directory",),
    "_contract.stats": ("LayerStats", "STATISTICS",),
    "_contract.operators": ("Operator", "Diagonal", "Triangular", "Dense", "Transform", "SpectrumChange",),
    "_contract.blocks": ("BlockContext", "BlockInputs",),
    "_contract.spectrum": ("MatrixSpectrum", "Selection", "Budget",),
    "_contract.factors": ("ScaledSVD", "build_factors", "scaled_gradient", "activation_error",),
    "_engine.factorize": ("scaled_svd",),
    "_contract.context": ("ModelContext", "RefineContext", "GradientPassInfo", "Probe",),
    "_contract.accounting": ("factored_params", "breakeven_rank", "stored_params", "uniform_rank", "floor_tolerant",),
    "_contract.model": ("Target", "weight_of", "set_weight_of", "as_out_in", "is_linear", "count_parameters", "max_positions",),
    "_engine.discovery": ("find_blocks", "find_targets",),
    "_contract.diagnostics": ("effective_rank", "participation_ratio", "effective_rank_tensor", "participation_ratio_tensor", "spectrum_diagnostics",),
    "_contract.cache": ("cache_dir",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "hookimpl", "install_transformers_hook", "__version__", "LowrankError", "RegistryError",
    "RecipeError", "CompressionError", "CheckpointError", "DeviceError", "Recipe", "Preset", "compress",
    "compress_checkpoint",
    "preflight", "resolve_device", "save", "load",
    "LowRankLinear", "CompressionReport", "MatrixReport", "inspect_model", "plot_inspection",
    "MatrixInfo", "get_registry", "reset_registry", "new_manager", "Registry", "PluginEntry",
    "Strategy", "strategy_config", "Scaling", "Allocator", "ComponentScorer", "Correction",
    "BlockCorrectionContext", "Exporter", "atomic_directory", "check_output_directory",
    "LayerStats", "STATISTICS", "Operator", "Diagonal", "Triangular", "Dense", "Transform",
    "SpectrumChange", "BlockContext", "BlockInputs", "MatrixSpectrum", "Selection", "Budget",
    "ScaledSVD", "build_factors", "scaled_gradient", "activation_error", "scaled_svd",
    "ModelContext", "RefineContext", "GradientPassInfo", "Probe", "factored_params",
    "breakeven_rank", "stored_params", "uniform_rank", "floor_tolerant", "Target", "weight_of",
    "set_weight_of", "as_out_in", "is_linear", "count_parameters", "max_positions", "find_blocks",
    "find_targets", "effective_rank", "participation_ratio", "effective_rank_tensor",
    "participation_ratio_tensor", "spectrum_diagnostics", "cache_dir",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'lowrank' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


install_transformers_hook()  # from_pretrained reads lowrank checkpoints (see _formats/hook.py)

if TYPE_CHECKING:  # pragma: no cover
    from ._contract.accounting import (
        breakeven_rank,
        factored_params,
        floor_tolerant,
        stored_params,
        uniform_rank,
    )
    from ._contract.allocator import Allocator, ComponentScorer
    from ._contract.blocks import BlockContext, BlockInputs
    from ._contract.cache import cache_dir
    from ._contract.context import GradientPassInfo, ModelContext, Probe, RefineContext
    from ._contract.correction import BlockCorrectionContext, Correction
    from ._contract.diagnostics import (
        effective_rank,
        effective_rank_tensor,
        participation_ratio,
        participation_ratio_tensor,
        spectrum_diagnostics,
    )
    from ._contract.errors import (
        CheckpointError,
        CompressionError,
        DeviceError,
        LowrankError,
        RecipeError,
        RegistryError,
    )
    from ._contract.exporter import Exporter, atomic_directory, check_output_directory
    from ._contract.factors import ScaledSVD, activation_error, build_factors, scaled_gradient
    from ._contract.layers import LowRankLinear
    from ._contract.model import (
        Target,
        as_out_in,
        count_parameters,
        is_linear,
        max_positions,
        set_weight_of,
        weight_of,
    )
    from ._contract.operators import (
        Dense,
        Diagonal,
        Operator,
        SpectrumChange,
        Transform,
        Triangular,
    )
    from ._contract.presets import Preset
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
    from ._engine.setup import preflight
    from ._engine.stream import compress_checkpoint
    from ._formats.io import load, save
