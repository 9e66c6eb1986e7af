"""The ``dense`` format: every factored layer multiplied back into an ordinary checkpoint.

A @ B is computed in float64 and cast to the layer dtype, so the merge adds no error beyond the
final rounding; any tool reads the result without lowrank (no size saving, no further loss).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from .._contract.exporter import check_output_directory
from .._contract.model import as_out_in
from .checkpoint import CheckpointExporter, empty_model_context, factored_layers, finish_assign
from .provenance import provenance_of

__all__ = ["DenseExporter"]


class DenseExporter(CheckpointExporter):
    """Merged dense weights as an ordinary checkpoint."""

    name = "dense"

    @staticmethod
    def dense_copy(model: Any) -> Any:
        """A model of the same class with each ``LowRankLinear`` replaced by its merged dense layer.

        Unfactored tensors are shared with ``model`` (no copy); ``model`` itself is not changed.
        """
        import torch

        config = copy.deepcopy(model.config)
        for attr in ("quantization_config", "_is_quantized"):
            if hasattr(config, attr):
                delattr(config, attr)
        with empty_model_context(model.dtype):
            dense = type(model)(config)
        state = dict(model.state_dict())
        with torch.no_grad():
            for name, layer in factored_layers(model).items():
                del state[f"{name}.A"], state[f"{name}.B"]
                target = dense.get_submodule(name)
                # float64 product so the merge adds no error beyond the final rounding, into the
                # dense layer's dtype (factors may be stored narrower, by a recipe's ``dtype``)
                weight = (layer.A.double() @ layer.B.double()).to(target.weight.dtype)
                weight = as_out_in(target, weight)  # GPT-2's Conv1D stores (in x out)
                state[f"{name}.weight"] = weight.contiguous()
                if layer.bias is not None:
                    state[f"{name}.bias"] = layer.bias.detach().to(target.weight.dtype)
        missing, unexpected = dense.load_state_dict(state, strict=False, assign=True)
        finish_assign(dense, missing, unexpected, "dense export")
        if getattr(model, "generation_config", None) is not None:
            dense.generation_config = copy.deepcopy(model.generation_config)
        return dense.eval()

    def save(self, model: Any, directory: str | os.PathLike[str], *, tokenizer: Any = None,
             recipe: Any = None, report: Any = None) -> Path:
        """Write an ordinary checkpoint (no ``quantization_config``; loads without lowrank)."""
        check_output_directory(directory)
        recipe, report = provenance_of(model, recipe, report)
        dense = self.dense_copy(model)
        return self._write(directory, tokenizer, recipe, report, dense.save_pretrained)

    def load(self, directory: str | os.PathLike[str], *, device: str = "cpu", dtype: Any = None) -> Any:
        """Plain ``AutoModelForCausalLM.from_pretrained``."""
        return self._load_plain(directory, device, dtype)
