"""The transformers side of the ``hf`` format: plain ``from_pretrained`` reads lowrank checkpoints.

A checkpoint written by the ``hf`` exporter records ``quantization_config = {"quant_method":
"lowrank", "rank_pattern": {module: rank}, ...}`` in ``config.json``. transformers builds the
architecture on the meta device, hands it to the quantizer registered for that ``quant_method``
(``preprocess_model`` -> ``_process_model_before_weight_loading``) and then loads the safetensors
into whatever parameters the model has. This module registers such a quantizer through
transformers' out-of-tree hooks (``register_quantization_config`` / ``register_quantizer``): its
only job is to swap every layer named in ``rank_pattern`` for an empty ``LowRankLinear`` so the
``<module>.A`` / ``<module>.B`` / ``<module>.bias`` tensors have somewhere to go. The factors are
ordinary floating-point parameters, so transformers' normal loading (dtype, device_map, tied
weights, sharding) does the rest.

Importing this module registers the quantizer (idempotently). ``lowrank`` imports it lazily, right
after ``transformers.quantizers.auto`` is imported (see ``hook.py`` beside this file), so it must import only
modules that are complete at that moment: nothing from ``transformers.modeling_utils``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .files import check_against, tensor_entries
from .hf_record import FORMAT_VERSION, QUANT_METHOD, check_record, replace_with_lowrank

__all__ = ["LowRankConfig", "LowRankHfQuantizer", "register"]

class LowRankConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an ``hf`` lowrank checkpoint (what ``config.json`` records)."""

    def __init__(self, rank_pattern: Mapping[str, int] | None = None, dtype_pattern: Mapping[str, str] | None = None,
                 format_version: int = FORMAT_VERSION,
                 exporter: str = "hf", targets: list[str] | None = None, ignore: list[str] | None = None,
                 recipe_name: str | None = None, lowrank_version: str | None = None,
                 quant_method: str = QUANT_METHOD, **kwargs: Any) -> None:
        self.quant_method = quant_method
        self.format_version = format_version
        self.exporter = exporter
        self.rank_pattern = dict(rank_pattern or {})
        self.dtype_pattern = dict(dtype_pattern or {})
        self.targets = targets
        self.ignore = list(ignore or [])
        self.recipe_name = recipe_name
        self.lowrank_version = lowrank_version
        # keep fields written by a newer minor version so a re-save does not drop them
        for key, value in kwargs.items():
            setattr(self, key, value)


class LowRankHfQuantizer(HfQuantizer):
    """Loads ``hf`` lowrank checkpoints in ``from_pretrained``: swaps in ``LowRankLinear`` layers.

    Nothing is quantized: the factors load like any float weight. A dense model cannot be
    compressed on the fly (``requires_calibration``): use :func:`lowrank.compress`.
    """

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        check_record(self.quantization_config.to_dict())

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: Any = None,
                                             **kwargs: Any) -> nn.Module:
        rank_pattern, dtype_pattern = check_record(self.quantization_config.to_dict())
        replace_with_lowrank(model, rank_pattern, dtype_pattern)
        files = [f for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
        if files:  # the headers against the config, before transformers reads a tensor
            where = os.path.dirname(str(files[0]))
            check_against(model, tensor_entries(files), where=where, kept_dtypes=dtype_pattern)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # a local checkpoint: bring back its recipe and report, as lowrank.load does
        directory = getattr(getattr(model, "config", None), "name_or_path", None)
        if directory and os.path.isdir(directory):
            from .provenance import attach_provenance

            attach_provenance(model, directory)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True  # the factors are plain tensors; save_pretrained writes them back as they were

    @property
    def is_trainable(self) -> bool:
        return True  # A and B are ordinary parameters

    @property
    def is_qat_trainable(self) -> bool:
        return True  # so transformers' Trainer fine-tunes the factors directly, without adapters


def register() -> None:
    """Register the config and the quantizer with transformers (once; safe to call again)."""
    for mapping, cls, add in ((AUTO_QUANTIZATION_CONFIG_MAPPING, LowRankConfig, register_quantization_config),
                              (AUTO_QUANTIZER_MAPPING, LowRankHfQuantizer, register_quantizer)):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is not None and existing.__module__ == __name__:
            del mapping[QUANT_METHOD]  # a stale class from a reload of this module
        add(QUANT_METHOD)(cls)  # another package owning "lowrank" makes transformers raise here


register()
