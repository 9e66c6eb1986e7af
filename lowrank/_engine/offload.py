"""Where the calibration hidden states wait between blocks: in memory, or in files on disk.

A compression holds the hidden states entering the current block for every calibration batch
(windows x tokens x hidden), and, while a block runs, the block's outputs for the next one: for a
70B model and the usual 128 x 512 calibration tokens, 2 GiB per copy in float32, several copies
with sequential inputs and a correction. That is more than one block's weights, so a streamed run
(``lowrank.compress_checkpoint``) can keep them on disk instead: ``offload="bfloat16"`` (or
``"float16"``: half the disk and the reads; ``"float32"``: exact, the result is bit for bit the
in-memory one) writes each batch as it is produced and reads one batch at a time back onto the
compute device in the compute dtype.

- :class:`MemoryStore` (the default) keeps plain Python lists; nothing changes.
- :class:`DiskStore` writes each stream (one block's outputs, the original model's beside them)
  to one file of raw bytes, appended batch by batch, and returns an :class:`OffloadedBatches`: a
  read-only sequence whose items are read from the file when indexed. The file lives as long as a
  sequence refers to it (a finalizer deletes it), so the planner's "restore the first block's
  inputs" and the resume state's hard links need no bookkeeping. Reads are plain ``readinto``
  calls into fresh tensors, not memory maps: resident memory is one batch, and the page cache the
  kernel may keep does not count against the process.

Rounding to bfloat16 changes the numbers (the next block sees inputs rounded to 8 bits of
mantissa): the report says so, and the Large models page gives the measured effect.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._contract.errors import CompressionError

__all__ = ["OFFLOAD_DTYPES", "HiddenStore", "MemoryStore", "DiskStore", "OffloadedBatches", "BatchWriter",
           "same_stream", "check_offload"]

#: The storage dtypes of ``offload``.
OFFLOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The compute dtypes a saved record may name (read from the resume state: data, never code).
_COMPUTE_DTYPES = {**OFFLOAD_DTYPES, "float64": torch.float64}


@dataclass(frozen=True)
class _Entry:
    """Where one batch sits in its file, and what it was."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype          # the dtype it had when written (the compute dtype)


class OffloadedBatches(Sequence[torch.Tensor]):
    """Hidden states of every calibration batch in one file; ``self[i]`` reads batch i onto ``device``."""

    def __init__(self, path: Path, entries: list[_Entry], storage: torch.dtype, device: torch.device,
                 owned: bool = True) -> None:
        self.path, self.entries, self.storage, self.device = path, entries, storage, device
        # the file goes when the last sequence reading it does (also on an error unwinding the run)
        self._finalizer = weakref.finalize(self, _unlink, str(path)) if owned else None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        entry = self.entries[index]
        raw = torch.empty(math.prod(entry.shape) * self.storage.itemsize, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(entry.offset)
            if f.readinto(memoryview(raw.numpy())) != raw.numel():
                raise CompressionError(f"offloaded hidden states: {self.path} is shorter than expected")
        return raw.view(self.storage).view(entry.shape).to(self.device, entry.dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum(math.prod(e.shape) for e in self.entries) * self.storage.itemsize

    def link(self, target: Path) -> dict:
        """A hard link (a copy across file systems) of the file at ``target``, and the record
        :meth:`opened` reads it back from (a resumed run's saved hidden states)."""
        target.unlink(missing_ok=True)
        _link_or_copy(self.path, target)
        return {"file": target.name, "storage": _dtype_name(self.storage),
                "entries": [[e.offset, list(e.shape), _dtype_name(e.dtype)] for e in self.entries]}

    @classmethod
    def opened(cls, record: dict, folder: Path, store: "DiskStore", device: torch.device) -> "OffloadedBatches":
        """The sequence of a :meth:`link` record in ``folder``, given its own link in ``store``'s
        folder (so that the saved file outlives it)."""
        try:
            entries = [_Entry(int(o), tuple(int(n) for n in s), _COMPUTE_DTYPES[d]) for o, s, d in record["entries"]]
            storage, source = OFFLOAD_DTYPES[record["storage"]], folder / Path(record["file"]).name
        except (KeyError, TypeError, ValueError) as err:
            raise CompressionError(f"--resume: the saved hidden states' record in {folder} is damaged "
                                   f"({err!r}); delete the work directory") from err
        own = store.new_path()
        _link_or_copy(source, own)
        return cls(own, entries, storage, device)


class BatchWriter:
    """Appends batches to a new file; :meth:`finish` gives the sequence that reads them."""

    def __init__(self, path: Path, storage: torch.dtype, device: torch.device) -> None:
        self.path, self.storage, self.device = path, storage, device
        self.entries: list[_Entry] = []
        self._file = open(path, "wb")
        self._offset = 0

    def append(self, batch: torch.Tensor) -> None:
        """Write ``batch`` (any device) at the end of the file."""
        data = batch.detach().to("cpu", self.storage).contiguous()
        self._file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self.entries.append(_Entry(self._offset, tuple(batch.shape), batch.dtype))
        self._offset += data.numel() * self.storage.itemsize

    def finish(self) -> OffloadedBatches:
        """Close the file; the batches as a sequence."""
        self._file.close()
        return OffloadedBatches(self.path, self.entries, self.storage, self.device)

    def __len__(self) -> int:
        return len(self.entries)


class HiddenStore:
    """How a run keeps a stream of hidden states: the base keeps them in memory, as lists."""

    #: The storage dtype's name when the states go to disk, else None.
    offload: str | None = None

    def writer(self) -> "list[torch.Tensor] | BatchWriter":
        """Something to ``append`` batches to; :meth:`done` turns it into the stream."""
        return []

    def done(self, writer: "list[torch.Tensor] | BatchWriter") -> Sequence[torch.Tensor]:
        """The finished stream of a :meth:`writer`."""
        return writer.finish() if isinstance(writer, BatchWriter) else writer

    def keep(self, batches: Iterable[torch.Tensor]) -> Sequence[torch.Tensor]:
        """``batches`` (consumed one at a time) as a stream of this store."""
        writer = self.writer()
        for batch in batches:
            writer.append(batch)
        return self.done(writer)


class MemoryStore(HiddenStore):
    """The default: every stream is a list of tensors on the compute device."""


def check_offload(offload: str | None) -> None:
    """A valid ``offload`` setting: None or a storage dtype's name."""
    if offload is not None and offload not in OFFLOAD_DTYPES:
        raise CompressionError(f"offload: expected one of {', '.join(OFFLOAD_DTYPES)} or None, got {offload!r}")


class DiskStore(HiddenStore):
    """Every stream a file in ``folder``, stored as ``dtype``, read back onto ``device``."""

    def __init__(self, folder: Path, dtype: str, device: torch.device) -> None:
        check_offload(dtype)
        self.folder, self.offload, self.device = Path(folder), dtype, device
        self.folder.mkdir(parents=True, exist_ok=True)
        self._names = itertools.count()
        self._pid = os.getpid()

    @property
    def note(self) -> str:
        """What the report says about it."""
        rounded = "" if self.offload == "float32" else " (rounded: the result differs slightly from an in-memory run)"
        return f"hidden states offloaded to disk in {self.offload} between blocks{rounded}"

    def new_path(self) -> Path:
        """A file name no stream of this process uses."""
        return self.folder / f"stream-{self._pid}-{next(self._names)}.bin"

    def writer(self) -> BatchWriter:
        return BatchWriter(self.new_path(), OFFLOAD_DTYPES[self.offload], self.device)  # type: ignore[index]


def same_stream(a: Sequence[torch.Tensor] | None, b: Sequence[torch.Tensor] | None) -> bool:
    """Whether two streams are the same hidden states (the very same tensors, or the same sequence)."""
    if a is None or b is None:
        return a is b
    if a is b:
        return True
    if isinstance(a, OffloadedBatches) or isinstance(b, OffloadedBatches):
        return False
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link of ``source`` at ``target`` (a copy across file systems)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
