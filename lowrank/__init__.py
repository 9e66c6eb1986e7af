"""lowrank: compress LLM linear layers by truncated SVD after an activation-aware change of basis.

Public API (imported lazily, so ``import lowrank`` does not import torch or transformers until a
name is used)::

    import lowrank
    recipe = lowrank.Recipe(scalings=["whitening"], allocator="uniform", ratio=0.2)
    report = lowrank.compress(model, recipe, calibration)   # in place
    lowrank.save(model, "out/", tokenizer=tokenizer)
    model = lowrank.load("out/")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._hookspecs import hookimpl
from . import _io  # noqa: F401  (cheap; lets from_pretrained read lowrank checkpoints, see _io)

__version__ = "0.1.0"

# name -> module that defines it (relative to this package)
_EXPORTS = {
    "LowrankError": "_errors", "RegistryError": "_errors", "RecipeError": "_errors", "CompressionError": "_errors",
    "Strategy": "_strategy", "strategy_config": "_strategy",
    "Scaling": "_scaling", "Transform": "_scaling", "LayerStats": "_scaling", "Diagonal": "_scaling",
    "Triangular": "_scaling", "Dense": "_scaling", "Operator": "_scaling",
    "Allocator": "_allocator", "Selection": "_allocator", "Budget": "_allocator", "MatrixSpectrum": "_allocator",
    "factored_params": "_allocator", "breakeven_rank": "_allocator", "stored_params": "_allocator",
    "Exporter": "_exporter", "atomic_directory": "_exporter",
    "LowRankLinear": "_layers",
    "Recipe": "_recipe",
    "CompressionReport": "_report", "MatrixReport": "_report",
    "compress": "_pipeline", "count_parameters": "_evaluate", "effective_rank": "_diagnostics",
    "participation_ratio": "_diagnostics",
    "get_registry": "_registry", "reset_registry": "_registry",
    "save": "_io", "load": "_io",
    "scaled_svd": "_factorize", "build_factors": "_factorize",
    "load_model": "_models", "resolve_model": "_models", "BUNDLED_MODELS": "_models",
    "load_text": "_text", "text_source_names": "_text",
    "load_windows": "_windows", "calibration_windows": "_windows", "evaluation_windows": "_windows",
    "tokenize_text": "_windows",
    "perplexity": "_evaluate", "PerplexityResult": "_evaluate",
    "austen_novel": "_austen", "AUSTEN_NOVELS": "_austen",
}

__all__ = ["hookimpl", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowrank' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from ._allocator import Allocator, Budget, MatrixSpectrum, Selection, breakeven_rank, factored_params, stored_params
    from ._errors import CompressionError, LowrankError, RecipeError, RegistryError
    from ._exporter import Exporter, atomic_directory
    from ._factorize import build_factors, scaled_svd
    from ._io import load, save
    from ._layers import LowRankLinear
    from ._diagnostics import effective_rank, participation_ratio
    from ._evaluate import count_parameters
    from ._pipeline import compress
    from ._recipe import Recipe
    from ._registry import get_registry, reset_registry
    from ._report import CompressionReport, MatrixReport
    from ._scaling import Dense, Diagonal, LayerStats, Operator, Scaling, Transform, Triangular
    from ._strategy import Strategy, strategy_config
    from ._austen import AUSTEN_NOVELS, austen_novel
    from ._evaluate import PerplexityResult, perplexity
    from ._models import BUNDLED_MODELS, load_model, resolve_model
    from ._text import load_text, text_source_names
    from ._windows import calibration_windows, evaluation_windows, load_windows, tokenize_text
