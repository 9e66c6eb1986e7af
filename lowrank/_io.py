"""``lowrank.save`` / ``lowrank.load``, and the hook that lets plain ``from_pretrained`` read ``hf``
checkpoints once ``lowrank`` is imported.

``import lowrank`` must stay cheap (no torch, no transformers), yet
``AutoModelForCausalLM.from_pretrained(dir)`` must find the ``lowrank`` quantizer afterwards. So
this module (imported by ``lowrank/__init__.py``) only installs a meta-path finder: right after
Python executes ``transformers.quantizers.auto`` -- the module that owns transformers' quantizer
registries, imported by ``modeling_utils`` before any model is loaded -- the finder imports
``lowrank._hf_quantizer``, which registers itself. If transformers' quantizers are already imported,
registration happens at once instead. Either way the cost is paid only by processes that use
transformers anyway.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import LowrankError

if TYPE_CHECKING:  # pragma: no cover
    from ._exporter import Exporter

__all__ = ["save", "load", "read_config", "attach_provenance", "install_transformers_hook"]

_QUANTIZER_MODULE = "transformers.quantizers.auto"


# -- registration with transformers ----------------------------------------------------------------


def _register_quantizer() -> None:
    try:
        from . import _hf_quantizer  # noqa: F401  (registers on import)
    except Exception as err:  # never break the import of transformers itself
        warnings.warn(f"lowrank: could not register the 'lowrank' quantizer with transformers: {err!r}; "
                      "use lowrank.load() to read hf checkpoints", RuntimeWarning, stacklevel=2)


class _RegisteringLoader:
    """Wraps the real loader of ``transformers.quantizers.auto`` and registers after it ran."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _remove_finder()
        _register_quantizer()

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ... stay the real ones
        return getattr(self._loader, name)


class _TransformersFinder:
    """A meta-path finder that only acts on ``transformers.quantizers.auto``; others are untouched."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _QUANTIZER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TransformersFinder)]


def install_transformers_hook() -> None:
    """Make ``from_pretrained`` understand ``quant_method: lowrank`` (now, or when transformers'
    quantizers are first imported)."""
    if _QUANTIZER_MODULE in sys.modules:
        _register_quantizer()
    elif not any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersFinder())


# -- save / load --------------------------------------------------------------------------------


def _exporter(spec: Any) -> "Exporter":
    from ._exporter import Exporter  # not at import time: it pulls in pydantic

    if isinstance(spec, Exporter):
        return spec
    if isinstance(spec, type) and issubclass(spec, Exporter):
        return spec()
    if isinstance(spec, str):
        from ._registry import get_registry

        return get_registry().get("exporter", spec)()
    raise LowrankError(f"exporter: expected a registered name or a lowrank.Exporter, got {spec!r}")


def save(model: Any, directory: str | os.PathLike[str], *, tokenizer: Any = None, exporter: Any = None) -> Path:
    """Write a compressed ``model`` (and ``tokenizer``, the recipe and the report) to ``directory``.

    Args:
        model: a model compressed by :func:`lowrank.compress` (or loaded back by :func:`load`).
        directory: a new or empty directory; it appears only once everything is written.
        tokenizer: saved beside the weights when given.
        exporter: a registered exporter name (``"hf"``, ``"dense"``) or an ``Exporter``; by default
            the recipe's exporter, else ``"hf"``. Only ``"dense"`` accepts a model that was never
            compressed (it then writes an ordinary checkpoint).
    """
    if exporter is None:
        recipe = getattr(model, "lowrank_recipe", None)
        exporter = getattr(recipe, "exporter", None) or "hf"
    return _exporter(exporter).save(model, directory, tokenizer=tokenizer)


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, as a dict."""
    import json

    path = Path(directory) / "config.json"
    if not path.is_file():
        raise LowrankError(f"{str(directory)!r} is not a model directory: it has no config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LowrankError(f"{path}: not valid JSON ({err})") from None


def attach_provenance(model: Any, directory: str | os.PathLike[str]) -> None:
    """Put the ``recipe.yaml`` / ``lowrank_report.json`` found beside a checkpoint back on the model
    (as ``compress`` leaves them), so that saving it again keeps them."""
    import json

    from ._recipe import RECIPE_FILE, Recipe
    from ._report import REPORT_FILE, CompressionReport

    directory = Path(directory)
    if (directory / REPORT_FILE).is_file():
        data = json.loads((directory / REPORT_FILE).read_text(encoding="utf-8"))
        model.lowrank_report = CompressionReport.from_dict(data)
    if (directory / RECIPE_FILE).is_file():
        try:
            model.lowrank_recipe = Recipe.load(directory / RECIPE_FILE)
        except LowrankError as err:  # e.g. a third-party scaling that is not installed here
            warnings.warn(f"lowrank: loaded the model but not its recipe: {err}", RuntimeWarning, stacklevel=3)


def load(directory: str | os.PathLike[str], *, device: str = "cpu", dtype: Any = None) -> Any:
    """Load a checkpoint written by :func:`save` (or any plain causal-LM checkpoint).

    A ``config.json`` whose ``quantization_config`` says ``quant_method: lowrank`` is read by the
    exporter it names; anything else by ``AutoModelForCausalLM.from_pretrained``. ``dtype`` (a
    ``torch.dtype`` or its name) casts floating-point weights; ``None`` keeps the saved dtype.
    """
    record = read_config(directory).get("quantization_config") or {}
    if isinstance(record, dict) and record.get("quant_method") == "lowrank":
        name = record.get("exporter", "hf")
    else:
        name = "dense"  # a plain checkpoint: the dense exporter's load is plain from_pretrained
    return _exporter(name).load(directory, device=device, dtype=dtype)


install_transformers_hook()
