"""Weights on disk: a model skeleton on the meta device, filled from safetensors shards one block at
a time, and the block's compressed tensors written to shards of their own.

Reads go through ``safetensors.safe_open`` (memory-mapped; only the tensors asked for are read).
Only safetensors files are ever opened; a tensor the architecture expects and the checkpoint lacks
(or holds in another shape) is a :class:`~lowrank.CompressionError` naming it, before anything is
computed on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._contract.errors import CompressionError

__all__ = ["ShardReader", "build_skeleton", "check_tensors", "load_tensors", "free_block", "release_freed_memory", "write_shard", "shard_name", "non_block_state",
           "read_source_config"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def shard_name(number: int, count: int) -> str:
    """``model-00001-of-00033.safetensors``: the name ``save_pretrained`` gives shard ``number``."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


class ShardReader:
    """The tensors of a safetensors checkpoint directory (sharded or not), read on demand.

    A shard is opened for each read and closed right after: safetensors memory-maps the file, and
    an open mapping keeps every page that was read resident, so holding the handles would make
    memory grow block after block.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        if (self.directory / INDEX).is_file():
            try:
                weight_map = json.loads((self.directory / INDEX).read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise CompressionError(f"{self.directory / INDEX}: not a valid safetensors index ({err})") from None
        elif (self.directory / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise CompressionError(f"{str(self.directory)!r} holds no {SINGLE} and no {INDEX}: a streamed run "
                                   "reads safetensors checkpoints only (save the model with save_pretrained)")
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = self.directory / name
            if Path(name).name != name or not path.is_file():
                raise CompressionError(f"{self.directory / INDEX} names {name!r}, which is not a file in the directory")
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for key in handle.keys():
                        self.location[key] = path
                        self.shapes[key] = tuple(handle.get_slice(key).get_shape())
            except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
                raise CompressionError(f"{path}: not a readable safetensors file ({err})") from None

    def names(self) -> set[str]:
        """Every tensor name the checkpoint holds."""
        return set(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the header (no data read)."""
        return self.shapes[name]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each shard opened once and closed again."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                out.update((k, handle.get_tensor(k)) for k in keys)
        return out


def read_source_config(directory: str | os.PathLike[str]) -> Any:
    """The ``AutoConfig`` of a source checkpoint, as a clear error when there is none."""
    from transformers import AutoConfig

    if not (Path(directory) / "config.json").is_file():
        raise CompressionError(f"{str(directory)!r} is not a model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CompressionError(f"{Path(directory) / 'config.json'}: transformers cannot read it ({err})") from None


def build_skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (buffers real, computed
    under ``dtype`` as the default dtype, as ``from_pretrained`` computes them)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def check_tensors(module: nn.Module, reader: ShardReader, prefix: str, *, skip: tuple[str, ...] = (),
                  optional: set[str] | frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """``module``'s state entries that the checkpoint holds (names under ``prefix``), each checked
    against its header (present, same shape); names under a ``skip`` prefix are left out,
    ``optional`` ones (tied copies) may be absent. No tensor is read."""
    wanted = {}
    for local, current in module.state_dict(keep_vars=True).items():
        full = f"{prefix}{local}"
        if any(local.startswith(s) for s in skip) or (full in optional and full not in reader.location):
            continue
        if full not in reader.location:
            raise CompressionError(f"{reader.directory}: the checkpoint has no tensor {full!r}, which "
                                   f"{type(module).__name__} needs; it is not a checkpoint of this config")
        shape = reader.shape(full)
        if shape != tuple(current.shape):
            raise CompressionError(f"{reader.directory}: {full!r} is {list(shape)} in the checkpoint, but the "
                                   f"config implies {list(current.shape)}")
        wanted[local] = current
    return wanted


def load_tensors(module: nn.Module, reader: ShardReader, prefix: str, *, skip: tuple[str, ...] = (),
                 optional: set[str] | frozenset[str] = frozenset()) -> None:
    """Fill ``module``'s state (names under ``prefix``) from the checkpoint, cast to each
    parameter's dtype (the arguments as for :func:`check_tensors`)."""
    state: dict[str, torch.Tensor] = {}
    wanted = check_tensors(module, reader, prefix, skip=skip, optional=optional)
    tensors = reader.read([f"{prefix}{local}" for local in wanted])
    for local, current in wanted.items():
        full = f"{prefix}{local}"
        tensor = tensors.pop(full)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CompressionError(f"the model has non-finite (NaN or inf) weights in {full}; nothing was written")
        # a copy: the tensor read is a view of the memory-mapped file, which must not be written
        state[local] = tensor.to(current.dtype, copy=True) if tensor.is_floating_point() else tensor.clone()
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    left = [m for m in missing if m in state]
    if unexpected or left:
        raise CompressionError(f"could not place {sorted(unexpected or left)[:4]} in {type(module).__name__}")


def free_block(block: nn.Module) -> None:
    """Every parameter of ``block`` back to the meta device; buffers stay (some are computed, not
    stored, and would not come back with the next read)."""
    for module in block.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type != "meta":
                module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


def release_freed_memory() -> None:
    """Hand the heap memory freed with a block back to the operating system (glibc's ``malloc_trim``).

    Without it glibc keeps the freed chunks of a block's many mid-sized tensors and the resident
    memory creeps up by some 20 MB per block on an 8B-sized model; elsewhere it does nothing.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def non_block_state(model: nn.Module, block_prefix: str) -> dict[str, torch.Tensor]:
    """What ``save_pretrained`` would write outside the decoder blocks (tied copies once)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {k: v for k, v in model.state_dict().items() if not k.startswith(block_prefix)}
    return remove_tied_weights_from_state_dict(state, model)


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors shard, written to a temporary name and renamed (a shard on disk is complete)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
