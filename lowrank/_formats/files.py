"""Checkpoint files are data from anyone: read only through safetensors, and checked before any
tensor is read.

:func:`tensor_entries` parses the safetensors headers (names, dtypes, shapes, byte ranges) without
reading a tensor and refuses a file that is truncated, corrupt or not safetensors at all;
:func:`check_against` compares those entries with the empty model that ``config.json`` describes
(every expected tensor present, none unknown, every shape and dtype right). Pickle files
(``*.bin``, ``*.pt``) are never loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .._contract.errors import CheckpointError

__all__ = ["SINGLE", "INDEX", "TensorEntry", "weight_files", "read_header", "tensor_entries",
           "check_against"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
             "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FLOAT = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_DAMAGED = "the checkpoint is damaged or was edited; nothing was loaded"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]


def _weight_map(directory: Path) -> list[str]:
    try:
        index = json.loads((directory / INDEX).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, UnicodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory / INDEX}: not a valid safetensors index ({err}); {_DAMAGED}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{directory / INDEX}: weight_map must map tensor names to file names; {_DAMAGED}")
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
    if bad:
        raise CheckpointError(f"{directory / INDEX}: names files outside the directory ({bad[:3]}); {_DAMAGED}")
    return names


def weight_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded or not); each must exist."""
    directory = Path(directory)
    names = _weight_map(directory) if (directory / INDEX).is_file() else [SINGLE]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing and names == [SINGLE]:
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        why = (f"it holds only pickle files ({', '.join(pickles[:3])}), which lowrank never loads; "
               "convert them to safetensors first") if pickles else "the weights are missing"
        raise CheckpointError(f"{str(directory)!r} has no {SINGLE}: {why}")
    if missing:
        raise CheckpointError(f"{str(directory)!r}: the index names {', '.join(missing[:3])}, which "
                              f"{'is' if len(missing) == 1 else 'are'} missing; {_DAMAGED}")
    return [directory / n for n in names]


def _entry(path: Path, name: str, info: Any, data_bytes: int) -> TensorEntry:
    """One header entry, checked: a known dtype, a shape, a byte range inside the file."""
    try:
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = (dtype in _ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in shape)
              and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: the header entry of {name!r} is malformed ({str(info)[:120]}); {_DAMAGED}")
    if end - start != math.prod(shape) * _ITEMSIZE[dtype]:
        raise CheckpointError(f"{path}: {name!r} is {dtype} {list(shape)} but spans {end - start} bytes; {_DAMAGED}")
    if end > data_bytes:
        raise CheckpointError(
            f"{path} is truncated: its header places {name!r} up to byte {end} of the data, but the "
            f"file holds {data_bytes} bytes of data; {_DAMAGED} (copy or download it again)")
    return TensorEntry(path.name, dtype, shape)


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares, checked against the file's size (no tensor is read)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes, too "
                                  f"short for the header its first 8 bytes announce); {_DAMAGED}")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeError, ValueError) as err:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({err}); {_DAMAGED}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; {_DAMAGED}")
    data_bytes = size - 8 - length
    return {name: _entry(path, name, info, data_bytes) for name, info in header.items() if name != "__metadata__"}


def tensor_entries(files: Iterable[str | os.PathLike[str]]) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint's files (a name in two shards is an error)."""
    entries: dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in read_header(path).items():
            if name in entries:
                raise CheckpointError(f"{name!r} is in both {entries[name].file} and {entry.file}; {_DAMAGED}")
            entries[name] = entry
    return entries


def _tied_sources(model: Any) -> dict[str, str]:
    """Tied parameter -> the parameter it shares (a tied copy is not stored twice)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    return {str(k): str(v) for k, v in tied.items()} if isinstance(tied, Mapping) else {}


def _patterns(model: Any, attr: str) -> list[str]:
    value = getattr(model, attr, None) or []
    return [str(p) for p in value] if isinstance(value, (list, tuple, set)) else []


def _missing(model: Any, expected: dict[str, Any], entries: Mapping[str, TensorEntry]) -> list[str]:
    """Parameters with no tensor: not stored, not tied to a stored one, not ignorable."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = _tied_sources(model)
    by_object: dict[int, list[str]] = {}
    for name, p in params.items():
        by_object.setdefault(id(p), []).append(name)
    ignore = _patterns(model, "_keys_to_ignore_on_load_missing")
    missing = []
    for name in expected:
        if name in entries or name not in params or tied.get(name) in entries:
            continue
        if any(alias in entries for alias in by_object[id(params[name])]):
            continue
        if not any(re.search(p, name) for p in ignore):
            missing.append(name)
    return missing


def _mismatches(expected: dict[str, Any], entries: Mapping[str, TensorEntry],
                kept_dtypes: Mapping[str, Any]) -> list[str]:
    """Shapes and dtypes that differ from what the config implies."""
    problems = []
    for name, tensor in expected.items():
        entry = entries.get(name)
        if entry is None:
            continue
        if tuple(tensor.shape) != entry.shape:
            problems.append(f"{name} is {list(entry.shape)} in {entry.file}, but config.json implies "
                            f"{list(tensor.shape)}")
        elif tensor.is_floating_point() and entry.dtype not in _FLOAT:
            problems.append(f"{name} is stored as {entry.dtype}, not as floating point")
    for layer, dtype in kept_dtypes.items():
        want = str(dtype).removeprefix("torch.")
        for key in (f"{layer}.A", f"{layer}.B"):
            entry = entries.get(key)
            if entry is not None and _FLOAT.get(entry.dtype) != want:
                problems.append(f"{key} is stored as {entry.dtype}, but config.json records {want}")
    return problems


def check_against(model: Any, entries: Mapping[str, TensorEntry], *, where: str, strict: bool = True,
                  kept_dtypes: Mapping[str, Any] | None = None) -> None:
    """Refuse a checkpoint whose tensors do not match ``model``, built empty from its config.

    Shapes (so the recorded ranks), floating-point dtypes and the dtypes recorded for factors kept
    in another dtype are always compared. ``strict`` (a checkpoint lowrank wrote) also refuses a
    parameter with no tensor (unless tied) and a tensor the architecture has no place for; a plain
    checkpoint leaves those to transformers, which maps legacy names.
    """
    expected = dict(model.state_dict(keep_vars=True))
    problems = _mismatches(expected, entries, kept_dtypes or {})
    if strict:
        missing = _missing(model, expected, entries)
        if missing:
            problems.append(f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:4])}")
        ignore = _patterns(model, "_keys_to_ignore_on_load_unexpected")
        extra = [n for n in entries if n not in expected and not any(re.search(p, n) for p in ignore)]
        if extra:
            problems.append(f"{len(extra)} tensor(s) the architecture has no place for, e.g. "
                            f"{', '.join(sorted(extra)[:4])}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{where}: the weights do not match config.json: {shown}. {_DAMAGED[0].upper()}{_DAMAGED[1:]}.")
