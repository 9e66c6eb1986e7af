"""Factor exporters: write a compressed model to a directory and load it back."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator

from .errors import LowrankError
from .strategy import Strategy

__all__ = ["Exporter", "atomic_directory", "check_output_directory"]


def check_output_directory(path: str | os.PathLike[str]) -> Path:
    """Refuse an output directory that exists and is not empty (nothing is written)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LowrankError(
            f"output directory {str(path)!r} exists and is not empty; pass a new or empty directory"
        )
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to ``path`` only on success.

    A failed or interrupted export leaves at most a hidden ``.path.partial-*`` directory, never a
    directory at ``path`` that looks complete.
    """
    path = check_output_directory(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            path.rmdir()  # empty, checked above
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Exporter(Strategy):
    """Writes a compressed model to a directory and reads it back."""

    kind: ClassVar[str] = "exporter"

    @abstractmethod
    def save(self, model: Any, directory: str | os.PathLike[str], *, tokenizer: Any = None,
             recipe: Any = None, report: Any = None) -> Path:
        """Write ``model`` (and what sits beside it) atomically to ``directory``."""

    @abstractmethod
    def load(self, directory: str | os.PathLike[str], *, device: str = "cpu", dtype: Any = None) -> Any:
        """Load a model written by :meth:`save`."""

    def finish_streamed(self, model: Any, directory: str | os.PathLike[str], weight_map: dict[str, str], *,
                        tokenizer: Any = None, recipe: Any = None, report: Any = None) -> None:
        """Complete a checkpoint whose weight shards a streamed run (``lowrank.compress_checkpoint``)
        already wrote into ``directory``: the config, the shard index, the provenance.

        Args:
            model: The model skeleton: non-block weights real, blocks on the meta device with the
                factored layers already swapped for (meta) ``LowRankLinear`` modules.
            directory: The directory holding the shards (not yet the final output directory).
            weight_map: Tensor name -> shard file name, every tensor written.
            tokenizer: Saved beside the weights when given.
            recipe: The recipe of the run.
            report: The report of the run.

        Raises:
            LowrankError: The exporter cannot write streamed checkpoints (the default).
        """
        raise LowrankError(f"exporter {self.name!r} cannot write a streamed checkpoint; use the 'hf' exporter")
