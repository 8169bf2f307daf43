"""Atomic, resumable, reshardable checkpoints: one folder per step, valid only once its marker exists.

Layout of ``<run_dir>/checkpoints/step_00000100/``:
- ``backbone/``: model and AdamW state through Megatron's ``dist_checkpointing`` on its ``torch_dist``
  backend, i.e. ``torch.distributed.checkpoint`` files addressed by global tensor names and offsets,
  so a checkpoint written at one TP/EP layout loads at any other;
- the Engram table's shard and meta files (``memory.table_files``; they reshard to any world size too);
- ``rank_<r>.pt``: what is per rank (RNG states, counters);
- ``meta.json`` (with the loader's global position, which resumes at any data-parallel size) and ``COMPLETE``.
Everything is written into ``step_<n>.partial`` first; once every rank's files are on disk rank 0
writes the marker and renames the folder, so a crash at any moment leaves either a complete checkpoint
or an ignored partial one. Our files load with ``weights_only=True``: they hold tensors and plain
Python values only; the backbone's DCP files load without running code too (``backbone.dcp_files``).

``meta.json`` records the sha256 of every other file of the folder. Resuming (``load_newest``) takes the
newest complete checkpoint that verifies and loads: one that does not is reported (folder, file, reason),
renamed ``step_<n>.damaged`` (never deleted, never pruned) and the previous one is tried. Partial folders
left by a crash are removed when a run starts.

With ``experiment.checkpoint_async=true`` the step boundary only plans the save and forks a writer
process per rank (Megatron's ``TemporalAsyncCaller``): the fork is the consistent snapshot (the
child sees memory as it was at the fork, copy-on-write, while the trainer goes on updating its own),
and the child writes the backbone, the table files and ``rank_<r>.pt``, that file last. Sealing
(``meta.json``, marker, rename, pruning) is collective, so it happens at a step boundary
that every rank agrees on: ``poll()`` all-reduces "my writer has finished" each step while a save is in
flight, as Megatron's ``AsyncCallsQueue`` does, and ``finalize()`` waits; the trainer finalizes
before the next save, after the last step and before a preemption exit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import pickle
import zipfile
from functools import partial as bind
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import (
    AsyncCallsQueue,
    AsyncRequest,
)
from torch.distributed.checkpoint.api import CheckpointException

from engram_train.atomic_files import atomic_torch_save, atomic_write_text
from engram_train.backbone.dcp_files import backbone_sharded_state_dict, load_backbone, read_dcp_metadata
from engram_train.memory import table_files
from engram_train.parallel import on_every_rank
from engram_train.preemption import die_with_parent, ignore_stop_signals_and_die_with_parent, stop_signals_blocked

MARKER = "COMPLETE"
#: Suffix of a checkpoint folder that failed verification or loading (kept for inspection).
SET_ASIDE = ".damaged"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
#: What reading a truncated, altered or planted file raises (a mismatch with the run is not damage).
_DAMAGE = (OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, CheckpointException)

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


class CheckpointWriteError(CheckpointError):
    """A save failed for an OS reason (disk full, quota, permissions): the message gives that cause and that the
    previous checkpoint is intact."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files do not verify or cannot be read; the message names the folder, the file and why."""


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


class Checkpointer:
    """Writes and finds the checkpoints of one run; ``save``, ``poll`` and ``finalize`` are collective."""

    def __init__(self, run_dir: Path, *, rank: int, world: int, keep: int, async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.world = world
        self.keep = keep
        self.async_save = async_save
        self._calls = AsyncCallsQueue() if async_save else None
        #: Final folder of the save whose writers are still running (async only); identical on every rank.
        self.in_flight: Path | None = None
        #: Called on rank 0 with each checkpoint folder once it is complete (sealed and renamed).
        self.on_sealed: Callable[[Path], None] | None = None

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def latest(self) -> Path | None:
        """Newest complete checkpoint; partial folders (no marker) are ignored."""
        complete = self.complete()
        return complete[0] if complete else None

    def save(self, step: int, *, model, optimizer, table, rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank writes its part, rank 0 seals the folder. Returns the final path.

        Synchronous: returns once the checkpoint is complete. Async: returns as soon as the snapshot is
        taken and the writers run; the folder is ``<final>.partial`` until ``poll``/``finalize`` seals it.
        """
        self.finalize()  # at most one save in flight: the previous one is sealed first
        final = self.step_dir(step)
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            if partial.exists():
                shutil.rmtree(partial)
            (partial / "backbone").mkdir(parents=True)
        _barrier()
        _shield_checkpoint_writer()
        meta = {**meta, "step": step, "world": self.world, "dp_rank_of_rank": _gather_objects(rank_state["dp_rank"]),
                "backbone_optimizer": optimizer.kind, "backbone_optimizer_layout": optimizer.fixed_layout}
        backbone = backbone_sharded_state_dict(model, optimizer)
        # One protocol either way: the backbone through DCP, this rank's table files, then rank_<r>.pt (each rank's
        # last file); _seal checks every rank's and seals. Sync runs it here, async in a forked writer on a snapshot.
        table_snapshot = table_files.snapshot_table(table) if table is not None else None
        if not self.async_save:
            with _forked_writers_die_with_trainer(), self._write_errors_explained(partial):
                dist_checkpointing.save(backbone, str(partial / "backbone"))
                _write_rank_files(partial, self.rank, table_snapshot, rank_state)
                self._seal(partial, final, meta)
            return final

        with _forked_writers_die_with_trainer(), self._write_errors_explained(partial):
            request = dist_checkpointing.save(backbone, str(partial / "backbone"), async_sharded_save=True)
        backbone_args = list(request.async_fn_args)
        if request.preload_fn is not None:  # GPU: copy to host now, the writer process only sees host memory
            backbone_args[1] = request.preload_fn()
        writer = AsyncRequest(
            _forked_writer,
            (request.async_fn, backbone_args, request.async_fn_kwargs, partial, self.rank, table_snapshot, rank_state),
            [*request.finalize_fns, bind(self._seal, partial, final, meta)],
        )
        with _forked_writers_die_with_trainer():
            self._calls.schedule_async_request(writer)
        self.in_flight = final
        return final

    def maybe_save(self, step: int, *, last: bool, preempted: bool, every: int, skipping: int, model, optimizer, table,
                   snapshot: Callable[[], tuple[dict[str, Any], dict[str, Any]]], say: Callable[[str], None]) -> Path | None:
        """Collective, after every step: seal a background save that has finished, then save when one is due (every
        ``every`` steps, the last step, a stop signal). Not while the last ``skipping`` steps were skipped: a
        diverging model must not replace good checkpoints. ``snapshot`` gives (this rank's state, meta); ``say``
        prints. Returns the folder of a save started now (complete on return unless async and not last/preempted)."""
        self._say_sealed(self.poll(), step, say)
        if not (preempted or last or (every and step % every == 0)):
            return None
        if skipping:
            say(f"[yellow]step {step}: no checkpoint while the last {skipping} step(s) were skipped; "
                f"{self.latest() or 'none'} stays the newest[/yellow]")
            return None
        self._say_sealed(self.finalize(), step, say)  # at most one save in flight
        rank_state, meta = snapshot()
        path = self.save(step, model=model, optimizer=optimizer, table=table, rank_state=rank_state, meta=meta)
        if preempted or last:
            self._say_sealed(self.finalize(), step, say)  # the run's last checkpoint is complete before it exits
        return path

    @staticmethod
    def _say_sealed(sealed: Path | None, step: int, say: Callable[[str], None]) -> None:
        if sealed is not None:
            say(f"checkpoint {sealed} complete at step {step} (written in the background)")

    def poll(self) -> Path | None:
        """Collective while a save is in flight: seal it if every rank's writer has finished; the sealed path."""
        return self._finish(blocking=False)

    def finalize(self) -> Path | None:
        """Collective: wait for the save in flight (if any) and seal it; the sealed path."""
        return self._finish(blocking=True)

    def abandon(self) -> None:
        """Not collective, for a run that failed: kill this rank's background writer of the save in flight. Its
        folder stays ``.partial`` (ignored on resume, removed at the next start); sealing would need every rank."""
        if self.in_flight is None:
            return
        while self._calls.async_calls:  # megatron-core's queue of started writers (one per save in flight)
            caller = self._calls.async_calls.popleft().async_caller
            process = caller.process
            caller.close(abort=True)  # sends SIGKILL and returns: the writer may still be running, then a zombie
            if process is not None:
                process.join(timeout=60)  # reaped: gone when abandon returns, not at some later fork
                if process.is_alive():
                    log.warning("checkpoint writer %d did not exit within 60 s of SIGKILL", process.pid)
        self.in_flight = None

    def _finish(self, *, blocking: bool) -> Path | None:
        if self.in_flight is None:
            return None
        with self._write_errors_explained(self.in_flight.with_name(self.in_flight.name + ".partial")):
            if not self._calls.maybe_finalize_async_calls(blocking=blocking):
                return None
        sealed, self.in_flight = self.in_flight, None
        return sealed

    def _seal(self, partial: Path, final: Path, meta: dict[str, Any]) -> None:
        """Collective: once every rank's files are on disk, rank 0 writes the marker and renames the folder."""
        # rank_<r>.pt is each rank's last file: where one is missing that rank's writer failed.
        if not on_every_rank((partial / f"rank_{self.rank}.pt").exists()):
            raise CheckpointError(
                f"{partial}: a rank's checkpoint writer failed (see that rank's log); the folder stays partial "
                "and is ignored on resume"
            )
        if self.rank == 0:
            meta = {**meta, "sha256": {name: file_sha256(partial / name) for name in _checked_files(partial)}}
            atomic_write_text(partial / "meta.json", json.dumps(meta, indent=2))
            (partial / MARKER).write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            self._prune()
            if self.on_sealed is not None:
                self.on_sealed(final)
        _barrier()

    @contextlib.contextmanager
    def _write_errors_explained(self, partial: Path):
        """Raise a failed save's OS cause. torch's zip writer and Megatron's writer processes report a full disk as
        ``unexpected pos 704 vs 598`` or a "Worker failure", so on any error we ask the filesystem directly: a
        small probe write there fails with the real errno (ENOSPC, EDQUOT, EACCES, EROFS...). The partial folder
        is removed (it holds space and never counts); the previous checkpoint is untouched."""
        try:
            yield
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as error:  # noqa: BLE001 - DCP's is a BaseException; any cause is asked
            cause = _filesystem_error(self.root)
            if cause is None:
                raise
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            previous = self.latest()
            raise CheckpointWriteError(
                f"{partial}: checkpoint not written: {cause.strerror} ({errno.errorcode.get(cause.errno, cause.errno)}, "
                f"found by a test write to {self.root}; the writer said: {_first_line(error)}). The previous checkpoint "
                f"{previous or '(none)'} is intact: free space (or point experiment.run_dir elsewhere) and relaunch to "
                "resume from it") from error

    def _prune(self) -> None:
        complete = sorted(d for d in self.root.iterdir() if _STEP_DIR.match(d.name) and (d / MARKER).exists())
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.root.exists():
            return []
        found = [d for d in self.root.iterdir() if _STEP_DIR.match(d.name) and (d / MARKER).exists()]
        return sorted(found, key=lambda d: int(_STEP_DIR.match(d.name).group(1)), reverse=True)

    def remove_stale_partials(self) -> None:
        """Rank 0, at start-up: delete what crashed saves left (``step_<n>.partial``); they never count."""
        if self.rank == 0 and self.root.exists():
            for stale in self.root.glob("step_*.partial"):
                log.warning("removing %s, left by a save that did not finish", stale)
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    def verify(self, path: Path) -> str | None:
        """What is wrong with ``path``'s files (``"<file>: <reason>"``), or None: every file has its recorded sha256
        (checkpoints written before checksums skip that), the DCP metadata holds only metadata types and every
        ``.pt`` file loads ``weights_only``."""
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as error:
            return f"meta.json: unreadable ({error})"
        for name, digest in meta.get("sha256", {}).items():
            if not (path / name).is_file():
                return f"{name}: missing"
            actual = file_sha256(path / name)
            if actual != digest:
                return f"{name}: sha256 {actual[:16]}... differs from the recorded {digest[:16]}... (truncated or altered)"
        # Readable without running code: DCP's metadata pickle, and every torch.save'd file (ours, Megatron's common.pt).
        readers = {"backbone/.metadata": read_dcp_metadata}
        readers.update({str(f.relative_to(path)): _read_weights_only for f in sorted(path.rglob("*.pt"))})
        for name, read in readers.items():
            try:
                read(path / name)
            except Exception as error:  # noqa: BLE001 - whatever a damaged or planted pickle raises
                return f"{name}: {_first_line(error)}"
        return None

    def load_newest(self, *, model, optimizer, table, dp_rank: int) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
        """Collective: load the newest checkpoint that verifies (on rank 0) and loads (on every rank).

        A damaged one is reported (folder, file, reason), renamed ``<folder>.damaged`` and the previous one
        is tried; a mismatch with the run (layout, optimizer, data) raises as ``load`` does. Returns
        (folder, this rank's state, meta), or None where there is no checkpoint. A failed load may have
        changed the model in part, so when checkpoints exist but none loads the run stops.
        """
        candidates, set_aside = self.complete(), []
        for path in candidates:
            problem = _broadcast_from_rank_0(self.verify(path) if self.rank == 0 else None)
            if problem is None:
                try:
                    saved, meta = self.load(path, model=model, optimizer=optimizer, table=table, dp_rank=dp_rank,
                                            verified=True)
                except DamagedCheckpointError as error:
                    problem = str(error).removeprefix(f"{path}: ")
                except _DAMAGE as error:
                    problem = _first_line(error)
                except RuntimeError as error:  # torch.load of a damaged zip
                    if "PytorchStreamReader" not in str(error):
                        raise
                    problem = _first_line(error)
                if on_every_rank(problem is None):
                    return path, saved, meta
                problem = problem or "loading failed on another rank (see its log)"
            set_aside.append(self._set_aside(path, problem))
        if candidates:
            raise DamagedCheckpointError(
                f"{self.root}: no checkpoint verifies and loads; they were set aside as {', '.join(map(str, set_aside))}. "
                "Inspect or restore one (rename it back to step_<n>), or relaunch to train from scratch")
        return None

    def _set_aside(self, path: Path, problem: str) -> Path:
        aside = path.with_name(path.name + SET_ASIDE)
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}{SET_ASIDE}-{n}")
        if self.rank == 0:
            os.replace(path, aside)
            log.warning("checkpoint %s is damaged (%s); set aside as %s (not deleted); trying the previous one",
                        path, problem, aside.name)
        _barrier()
        return aside

    def load(self, path: Path, *, model, optimizer, table, dp_rank: int,
             verified: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore model, optimizer and table in place (any layout); return this DP rank's state and meta.

        Checks the files first unless the caller did (``verified``); raises ``DamagedCheckpointError`` naming
        the file where one does not verify.
        """
        path = Path(path)
        if not (path / MARKER).exists():
            raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker); pick another step folder")
        problem = None if verified else self.verify(path)
        if problem is not None:
            raise DamagedCheckpointError(f"{path}: {problem}")
        meta = json.loads((path / "meta.json").read_text())
        # Any data-parallel size resumes: the loader's position is global (meta.json), RNG states and counters are
        # those of a rank that saved them (no training randomness depends on the rank: dropout is off).
        saved_dp = len(set(meta["dp_rank_of_rank"]))
        source = {d: r for r, d in reversed(list(enumerate(meta["dp_rank_of_rank"])))}  # dp rank -> its first rank
        saved_optimizer = meta.get("backbone_optimizer", "torch_adamw")
        if saved_optimizer != optimizer.kind:
            setting = {"torch_adamw": "false", "megatron_distributed": "true"}
            raise CheckpointError(
                f"{path}: its backbone optimizer state is {saved_optimizer}, this run's optimizer is {optimizer.kind}; "
                f"resume with optim.distributed={setting.get(saved_optimizer, '?')} as the run that wrote it"
            )
        saved_layout = meta.get("backbone_optimizer_layout")
        if saved_layout is not None:
            saved_layout = {"experts": "sequential", **saved_layout}  # written before grouped experts existed
        if saved_layout is not None and saved_layout != optimizer.fixed_layout:
            raise CheckpointError(
                f"{path}: its distributed-optimizer state was written at parallel.tp={saved_layout['tp']} "
                f"parallel.ep={saved_layout['ep']} model.experts={saved_layout['experts']} and loads only there "
                f"(this run: {optimizer.fixed_layout}); resume with those settings"
            )
        load_backbone(model, optimizer, path / "backbone")
        if table is not None:
            table_files.load_table(table, path)
        state = torch.load(path / f"rank_{source[dp_rank % saved_dp]}.pt", map_location="cpu", weights_only=True)
        if "loader" in meta:
            state["loader"] = meta["loader"]
        elif "loader" in state:  # written before the global position: every dp rank's own state, converted by the loader
            state["loader"] = [torch.load(path / f"rank_{source[d]}.pt", map_location="cpu", weights_only=True)["loader"]
                               for d in range(saved_dp)]
        return state, meta


def _write_rank_files(folder: Path, rank: int, table_snapshot: table_files.TableSnapshot | None, rank_state) -> None:
    """A rank's files after its backbone part: its table files, then rank_<r>.pt (its last), each fsynced."""
    if table_snapshot is not None:
        table_files.write_table_files(table_snapshot, folder)
    atomic_torch_save(rank_state, folder / f"rank_{rank}.pt")


def _forked_writer(backbone_fn, backbone_args, backbone_kwargs, folder: Path, rank: int, table_snapshot,
                   rank_state) -> None:
    """Body of an asynchronous save's forked writer: the backbone (Megatron's writer), then the rank's files."""
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    backbone_fn(*backbone_args, **backbone_kwargs)
    _write_rank_files(folder, rank, table_snapshot, rank_state)


def _init_writer_manager(trainer_pid: int) -> None:
    """Ignore the scheduler's stop signals, but die with the trainer: after a kill -9 of the trainer an
    orphaned manager ignoring SIGTERM would otherwise live on (and spin)."""
    ignore_stop_signals_and_die_with_parent(trainer_pid)


_forking_writers = False


def _after_fork_in_child() -> None:
    if _forking_writers:
        die_with_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _forked_writers_die_with_trainer():
    """Processes forked meanwhile (Megatron's per-file writers, our async writer) die with the trainer.

    Killed mid-save (kill -9, a node failure), a trainer otherwise leaves its writers behind for good,
    blocked on the lock of a queue whose other end is gone.
    """
    global _forking_writers
    _forking_writers = True
    try:
        yield
    finally:
        _forking_writers = False


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
        with stop_signals_blocked():  # until the manager has set its own dispositions
            manager.start(initializer=_init_writer_manager, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


def _filesystem_error(folder: Path, probe_bytes: int = 1 << 20) -> OSError | None:
    """The OSError a write of ``probe_bytes`` into ``folder`` raises now, or None where it succeeds."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(os.urandom(probe_bytes))
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as error:
        return error
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _read_weights_only(path: Path) -> None:
    torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _checked_files(folder: Path) -> list[str]:
    """The files whose sha256 ``meta.json`` records: all but itself and the marker."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in ("meta.json", MARKER))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _broadcast_from_rank_0(value: Any) -> Any:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_objects(value: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
