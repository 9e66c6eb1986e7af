"""The ``hf`` format: a Hugging Face checkpoint directory with the factors as they are.

Factored layers are stored as ``<module>.A`` / ``<module>.B`` / ``<module>.bias``. ``config.json``
carries the ``quantization_config`` record of ``hf_record.py``, so :func:`lowrank.load` -- or plain
``AutoModelForCausalLM.from_pretrained`` once ``lowrank`` is imported -- rebuilds the same modules
and reproduces the logits bit for bit. The tokenizer, ``recipe.yaml`` and ``lowrank_report.json``
sit beside the weights; the write is atomic and leaves the model passed in untouched.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from .._contract.errors import LowrankError
from .._contract.exporter import check_output_directory
from .._version import __version__
from .checkpoint import (
    CheckpointExporter,
    empty_model_context,
    factored_layers,
    finish_assign,
    model_class,
    read_hf_config,
    read_tensors,
    saved_dtype,
    torch_dtype,
)
from .files import check_against, tensor_entries, weight_files
from .hf_record import FORMAT_VERSION, QUANT_METHOD, check_record, replace_with_lowrank
from .provenance import attach_provenance, provenance_of
from .shards import finish_hf_streamed

__all__ = ["HFExporter"]


class HFExporter(CheckpointExporter):
    """Hugging Face directory with factorized weights; reloads with from_pretrained."""

    name = "hf"

    def record(self, model: Any, recipe: Any = None) -> dict[str, Any]:
        """The ``quantization_config`` written to ``config.json``."""
        old = getattr(model.config, "quantization_config", None)
        old = old.to_dict() if hasattr(old, "to_dict") else dict(old or {})
        layers = factored_layers(model)
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "exporter": self.name,
            "rank_pattern": {n: int(m.rank) for n, m in layers.items()},
            # factors deliberately stored in another dtype than the model's (a recipe's ``dtype``):
            # from_pretrained would otherwise cast them to the model's dtype
            "dtype_pattern": {n: str(m.A.dtype).removeprefix("torch.") for n, m in layers.items()
                              if m.A.dtype != model.dtype},
            "targets": recipe.targets if recipe is not None else old.get("targets"),
            "ignore": list(recipe.ignore) if recipe is not None else old.get("ignore", []),
            "recipe_name": recipe.name if recipe is not None else old.get("recipe_name"),
            "lowrank_version": __version__,
        }

    def save(self, model: Any, directory: str | os.PathLike[str], *, tokenizer: Any = None,
             recipe: Any = None, report: Any = None) -> Path:
        """Write ``model`` with its factors as they are (see the module docstring)."""
        check_output_directory(directory)
        recipe, report = provenance_of(model, recipe, report)
        if not factored_layers(model) and recipe is None and getattr(model.config, "quantization_config", None) is None:
            raise LowrankError(
                "hf export: the model has no LowRankLinear layer and no lowrank_recipe, so it was never "
                "compressed; run lowrank.compress first, or write an ordinary checkpoint with exporter='dense'"
            )
        record = self.record(model, recipe)

        def write_weights(tmp: Path) -> None:
            # save_pretrained writes config.json from model.config (and sets its dtype and
            # architectures): hand it a copy that carries the record, then put the original back.
            original = model.config
            config = copy.deepcopy(original)
            config.quantization_config = record
            model.config = config
            try:
                model.save_pretrained(tmp)
            finally:
                model.config = original

        return self._write(directory, tokenizer, recipe, report, write_weights)

    def finish_streamed(self, model: Any, directory: str | os.PathLike[str], weight_map: dict[str, str], *,
                        tokenizer: Any = None, recipe: Any = None, report: Any = None) -> None:
        """Complete a streamed run's shards into an ``hf`` checkpoint (``_formats/shards.py``)."""
        finish_hf_streamed(self, model, directory, weight_map, tokenizer=tokenizer, recipe=recipe, report=report)

    def load(self, directory: str | os.PathLike[str], *, device: str = "cpu", dtype: Any = None) -> Any:
        """Rebuild the architecture with empty parameters, swap in ``LowRankLinear`` per
        ``rank_pattern``, check the safetensors headers against it (shapes, ranks, dtypes, counts),
        then assign the tensors and tie weights. Independent of the quantizer hook."""
        from transformers import GenerationConfig

        path = Path(directory)
        config = read_hf_config(path)
        record = getattr(config, "quantization_config", None) or {}
        rank_pattern, dtype_pattern = check_record(record.to_dict() if hasattr(record, "to_dict") else record)
        files = weight_files(path)
        entries = tensor_entries(files)  # headers only: a truncated or corrupt file fails here
        dtype = torch_dtype(dtype)
        with empty_model_context(dtype or saved_dtype(config)):
            model = model_class(config)(config)
        replace_with_lowrank(model, rank_pattern, dtype_pattern)
        check_against(model, entries, where=str(path), kept_dtypes=dtype_pattern)

        state: dict[str, Any] = {}
        for file in files:
            state.update(read_tensors(file, str(device)))
        if dtype is not None:  # cast what the checkpoint holds in the model's dtype
            kept = {f"{n}.{p}" for n in dtype_pattern for p in ("A", "B", "bias")}
            state = {k: v.to(dtype) if v.is_floating_point() and k not in kept else v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        finish_assign(model, missing, unexpected, f"loading {path}")
        model.to(device)  # the buffers, built on the CPU
        if model.can_generate() and (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        attach_provenance(model, path)
        return model.eval()
