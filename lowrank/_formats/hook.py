"""The hook that lets plain ``from_pretrained`` read ``hf`` checkpoints once ``lowrank`` is imported.

``import lowrank`` must stay cheap (no torch, no transformers), yet
``AutoModelForCausalLM.from_pretrained(dir)`` must find the ``lowrank`` quantizer afterwards. So
``lowrank/__init__.py`` only installs a meta-path finder from this module: right after Python
executes ``transformers.quantizers.auto`` -- the module that owns transformers' quantizer
registries, imported by ``modeling_utils`` before any model is loaded -- the finder imports
``hf_quantizer``, which registers itself. If transformers' quantizers are already imported,
registration happens at once instead. Either way the cost is paid only by processes that use
transformers anyway.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

__all__ = ["install_transformers_hook"]

_QUANTIZER_MODULE = "transformers.quantizers.auto"


def _register_quantizer() -> None:
    try:
        from . import hf_quantizer  # noqa: F401  (registers on import)
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
