"""Atomic, resumable, reshardable checkpoints: one folder per step, valid only once its marker exists.

Layout of ``<run_dir>/checkpoints/step_00000100/``:
- ``backbone/``: model and AdamW state through Megatron's ``dist_checkpointing`` on its ``torch_dist``
  backend, i.e. ``torch.distributed.checkpoint`` files addressed by global tensor names and offsets,
  so a checkpoint written at one TP/EP layout loads at any other;
- the Engram table's shard files (``ShardedEngramTable.save``; they reshard to any world size too);
- ``rank_<r>.pt``: what is per data-parallel rank (loader position, RNG states, counters);
- ``meta.json`` and ``COMPLETE``.
Everything is written into ``step_<n>.partial`` first; after a barrier rank 0 writes the marker and
renames the folder, so a crash at any moment leaves either a complete checkpoint or an ignored partial
one. Our files load with ``weights_only=True``: they hold tensors and plain Python values only.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shutil
import signal
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async

from engram_train.backbone.checkpoint import backbone_sharded_state_dict, load_backbone

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return _to_plain(state)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy[0], np.asarray(numpy[1], dtype=np.uint32), *numpy[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_plain(value: Any) -> Any:
    """Numpy arrays and tuples to types the weights_only unpickler accepts."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, run_dir: Path, *, rank: int, world: int, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.world = world
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def latest(self) -> Path | None:
        """Newest complete checkpoint; partial folders (no marker) are ignored."""
        if not self.root.exists():
            return None
        complete = [
            d for d in self.root.iterdir() if _STEP_DIR.match(d.name) and (d / MARKER).exists()
        ]
        return max(complete, key=lambda d: int(_STEP_DIR.match(d.name).group(1)), default=None)

    def save(self, step: int, *, model, optimizer, table, rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank writes its part, rank 0 seals the folder. Returns the final path."""
        final = self.step_dir(step)
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            if partial.exists():
                shutil.rmtree(partial)
            (partial / "backbone").mkdir(parents=True)
        _barrier()
        _shield_checkpoint_writer()
        dist_checkpointing.save(backbone_sharded_state_dict(model, optimizer), str(partial / "backbone"))
        if table is not None:
            table.save(partial)
        atomic_torch_save(rank_state, partial / f"rank_{self.rank}.pt")
        dp_ranks = _gather_objects(rank_state["dp_rank"])
        _barrier()
        if self.rank == 0:
            meta = {**meta, "step": step, "world": self.world, "dp_rank_of_rank": dp_ranks}
            (partial / "meta.json").write_text(json.dumps(meta, indent=2))
            (partial / MARKER).write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        complete = sorted(d for d in self.root.iterdir() if _STEP_DIR.match(d.name) and (d / MARKER).exists())
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, *, model, optimizer, table, dp_rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore model, optimizer and table in place (any layout); return this DP rank's state and meta."""
        path = Path(path)
        if not (path / MARKER).exists():
            raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker); pick another step folder")
        meta = json.loads((path / "meta.json").read_text())
        sources = [r for r, d in enumerate(meta["dp_rank_of_rank"]) if d == dp_rank]
        if not sources:
            raise CheckpointError(
                f"{path}: written with {len(set(meta['dp_rank_of_rank']))} data-parallel ranks, this run has data-parallel "
                f"rank {dp_rank}; keep world/parallel.tp at the same data-parallel size to resume the data stream"
            )
        load_backbone(model, optimizer, path / "backbone")
        if table is not None:
            table.load(path)
        state = torch.load(path / f"rank_{sources[0]}.pt", map_location="cpu", weights_only=True)
        return state, meta


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _shield_checkpoint_writer() -> None:
    """Keep Megatron's checkpoint writer alive through scheduler signals.

    Its writer reports through a queue served by a spawned manager process. Schedulers (srun,
    scancel, preemption) signal every process of a task, and a spawned process dies of SIGTERM or
    SIGUSR1 by default, so the preemption checkpoint, written right after such a signal, broke with
    BrokenPipeError. We start that manager ourselves with the stop signals ignored; the trainer
    itself still sees them (PreemptionWatch).
    """
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_ignore_stop_signals)
        filesystem_async._results_queue = manager.Queue()


def _gather_objects(value: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
