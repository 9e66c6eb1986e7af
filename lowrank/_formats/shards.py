"""The ``hf`` format written in pieces: a streamed run writes the weight shards block by block,
then :func:`finish_hf_streamed` adds what ``save_pretrained`` would have written beside them.

The result is the same directory :meth:`HFExporter.save` writes for the same model, except that
the weights are split into one shard per decoder block (plus one for the embeddings, norms and
head) with a ``model.safetensors.index.json``: ``config.json`` with the ``quantization_config``
record, ``generation_config.json``, the tokenizer, ``recipe.yaml`` and ``lowrank_report.json``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from .._contract.errors import LowrankError
from .files import INDEX, read_header
from .provenance import write_provenance

__all__ = ["finish_hf_streamed", "write_index"]


def write_index(directory: Path, weight_map: dict[str, str]) -> None:
    """``model.safetensors.index.json`` for ``weight_map``, with the total size from the headers."""
    total = 0
    for name in sorted(set(weight_map.values())):
        path = directory / name
        entries = read_header(path)  # the shard is complete (truncated ones fail here)
        missing = [t for t, f in weight_map.items() if f == name and t not in entries]
        if missing:
            raise LowrankError(f"{path}: the shard lacks {missing[:3]}, which the index would name")
        total += path.stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def finish_hf_streamed(exporter: Any, model: Any, directory: str | os.PathLike[str], weight_map: dict[str, str], *,
                       tokenizer: Any = None, recipe: Any = None, report: Any = None) -> None:
    """Write ``config.json`` (with ``exporter``'s record), the generation config, the index and the
    provenance into ``directory``, where the shards of ``weight_map`` already are."""
    directory = Path(directory)
    config = copy.deepcopy(model.config)
    config.quantization_config = exporter.record(model, recipe)
    # what save_pretrained records about the model it writes
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    write_index(directory, weight_map)
    write_provenance(directory, tokenizer, recipe, report)
