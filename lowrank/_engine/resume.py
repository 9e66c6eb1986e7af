"""The work directory of a streamed run: the output being written and what a resumed run needs.

``<work>/out/`` holds the shards written so far (it becomes the output directory, renamed, when the
run ends); ``<work>/state.json`` says how many blocks are finished, the weight map, the report so
far and the global allocator's plan; ``<work>/hidden-<k>.safetensors`` holds the hidden states
entering block k (every calibration batch) and the RNG states (CPU, current CUDA device); a run
that offloads its hidden states (``_engine/offload.py``) keeps them in ``hidden-<k>.<stream>.bin``
beside it, hard links of the offload files, named in the safetensors metadata.
``state.json`` is written last and atomically after each block: it is the commit point, so a run
killed at any moment resumes from the last block it names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._contract.blocks import BlockInputs
from .._contract.errors import CompressionError
from .._contract.spectrum import Selection
from .offload import DiskStore, HiddenStore, OffloadedBatches, same_stream

__all__ = ["WorkDir", "RunState", "fingerprint"]

STATE_VERSION = 1


def fingerprint(*parts: Any) -> str:
    """A hash of what must not change between a run and its resumption (recipe, calibration, ...)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(str((part.dtype, tuple(part.shape))).encode())
            digest.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class RunState:
    """What ``state.json`` records after each finished block."""

    fingerprint: str
    done: int = 0
    weight_map: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    plan: dict[str, list[list[float] | None]] | None = None

    def plan_selections(self) -> dict[str, Selection] | None:
        """The saved plan as selections (None when none was saved)."""
        if self.plan is None:
            return None
        return {name: Selection(None if idx is None else tuple(int(i) for i in idx),
                                None if scale is None else tuple(float(s) for s in scale))
                for name, (idx, scale) in self.plan.items()}

    @staticmethod
    def plan_record(plan: dict[str, Selection]) -> dict[str, list[list[float] | None]]:
        """A plan as JSON-ready lists."""
        return {name: [None if s.indices is None else list(s.indices), None if s.rescale is None else list(s.rescale)]
                for name, s in plan.items()}


class WorkDir:
    """The hidden sibling directory ``.<out name>.lowrank-work`` (or the one given) of a run."""

    def __init__(self, out: Path, work: Path | None = None, tag: str = "") -> None:
        self.out = out
        self.path = work if work is not None else out.parent / f".{out.name}.lowrank-work"
        self.shards = self.path / "out"
        # each process of a multi-process run saves its own share of the hidden states
        self.tag = tag

    def begin(self, key: str, resume: bool) -> RunState:
        """A fresh work directory, or (``resume``) the state an interrupted run left."""
        state_file = self.path / "state.json"
        if resume:
            if not state_file.is_file():
                raise CompressionError(f"--resume: {self.path} holds no interrupted run to resume "
                                       "(run without --resume to start one)")
            state = RunState(**json.loads(state_file.read_text(encoding="utf-8")).get("state", {}))
            if state.fingerprint != key:
                raise CompressionError(
                    f"--resume: the run in {self.path} used another model, recipe, calibration, dtype, "
                    "batch size, number of processes or offload setting; resume with the same arguments, or "
                    "delete that directory to start again")
            return state
        if self.path.exists():
            raise CompressionError(
                f"{self.path} exists: an earlier run of this output was interrupted; pass resume=True "
                "(--resume) to continue it, or delete that directory to start again")
        self.shards.mkdir(parents=True)
        state = RunState(key)
        self.commit(state)
        return state

    def commit(self, state: RunState) -> None:
        """Write ``state.json`` atomically (the commit point of a block)."""
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps({"version": STATE_VERSION, "state": state.__dict__}), encoding="utf-8")
        os.replace(tmp, self.path / "state.json")

    def save_hidden(self, done: int, inputs: BlockInputs) -> None:
        """The hidden states entering block ``done`` (and the original model's, when the run carries
        them) and the RNG states (CPU, current CUDA device), before the commit. Offloaded streams
        are already files: they are hard-linked beside the state and named in its metadata."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        record: dict[str, Any] = {}
        streams = {"hidden": inputs.hidden, "reference": getattr(inputs, "reference", None)}
        for name, stream in streams.items():
            if stream is None:
                continue
            if name == "reference" and same_stream(stream, inputs.hidden):
                record["reference"] = "hidden"   # nothing compressed upstream yet: one stream
            elif isinstance(stream, OffloadedBatches):
                record[name] = stream.link(self.path / f"hidden-{done}{self.tag}.{name}.bin")
            else:
                tensors.update({f"{name}.{i}": h.detach().to("cpu").contiguous() for i, h in enumerate(stream)})
        tensors["rng"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["cuda_rng"] = torch.cuda.get_rng_state()
        tmp = self.path / f"hidden-{done}{self.tag}.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"streams": json.dumps(record)})
        os.replace(tmp, self.path / f"hidden-{done}{self.tag}.safetensors")

    def drop_hidden(self, keep: int) -> None:
        """Delete this process's hidden states of every block but ``keep`` (after the commit)."""
        for path in self.path.glob(f"hidden-*{self.tag}.*"):
            if not path.name.startswith(f"hidden-{keep}{self.tag}."):
                path.unlink(missing_ok=True)

    def load_hidden(self, done: int, inputs: BlockInputs, device: torch.device, store: HiddenStore) -> None:
        """Put the saved hidden states entering block ``done`` into ``inputs`` (into ``store``'s
        files when the run offloads them); restore the RNG states."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.path / f"hidden-{done}{self.tag}.safetensors"
        if not path.is_file():
            raise CompressionError(f"--resume: {path} is missing; the work directory is damaged, delete it")
        with safe_open(str(path), "pt") as f:
            record = json.loads((f.metadata() or {}).get("streams", "{}"))
        tensors = load_file(str(path))
        torch.set_rng_state(tensors.pop("rng"))
        cuda_rng = tensors.pop("cuda_rng", None)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng)
        count = len(inputs.hidden)

        def stream(name: str):
            if isinstance(record.get(name), dict):
                if not isinstance(store, DiskStore):
                    raise CompressionError("--resume: the interrupted run offloaded its hidden states; "
                                           "resume it with the same offload setting")
                return OffloadedBatches.opened(record[name], self.path, store, device)
            if f"{name}.0" not in tensors:
                return None
            return store.keep(tensors[f"{name}.{i}"].to(device) for i in range(count))

        inputs.hidden = stream("hidden")  # type: ignore[assignment]
        reference = inputs.hidden if record.get("reference") == "hidden" else stream("reference")
        if reference is not None:
            inputs.reference = reference

    def finish(self) -> None:
        """Rename the finished checkpoint to the output directory and delete the work directory."""
        if self.out.exists():
            self.out.rmdir()  # checked empty before the run
        self.out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.shards, self.out)
        shutil.rmtree(self.path, ignore_errors=True)
