"""Training and validation loaders: batches of packed rows plus their Engram hash ids.

Exact resume with several worker processes rests on three fixed orders:

1. each (rank, logical worker) reads its own shards in a fixed order (``stream.assign_shards``),
   cutting its row stream into batches of ``micro_batch_size`` rows, across epoch boundaries, so no
   row is dropped or repeated;
2. the rank's batch j comes from logical worker ``j % workers`` (torch's DataLoader hands out
   batches of an IterableDataset round-robin over its workers, and we check it does);
3. the state is ``batches`` consumed plus, per logical worker, the cursor after its last consumed
   batch. Batches prefetched but not consumed are not part of the state, so they are simply
   produced again after a resume.

On resume, DataLoader worker i plays logical worker ``(i + batches) % workers`` so the round-robin
continues where it stopped. The cursors are per-worker row positions, so a checkpoint taken with a
different ``micro_batch_size`` still resumes without loss; a different dp world or worker count
changes which rows each stream owns and is refused.

Hash ids are computed in the workers (the trainer then only does table lookups).

The workers are the trainer's helpers: they ignore the scheduler's stop signals (the trainer alone checkpoints
and exits on them), die with the trainer (a ``kill -9`` of a rank leaves nothing that holds its sockets), and
a worker that dies anyway (the OOM killer, a stray ``kill``) is restarted at the consumed position, which
keeps the data order exact.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from engram_train.data.manifest import PREPARE_HINT, DataError, Dataset, open_dataset
from engram_train.data.stream import BadShard, RowStream, StreamSpec, read_shard
from engram_train.memory.dedup import UniqueIds
from engram_train.preemption import ignore_stop_signals_and_die_with_parent, stop_signals_blocked

log = logging.getLogger(__name__)


@dataclass
class LoaderState:
    """Position of one rank's training loader; plain types, so ``torch.load(weights_only=True)`` reads it."""

    dp_world: int
    dp_rank: int
    #: Logical workers (``max(1, data.num_workers)``); each owns a fixed share of the shards.
    workers: int
    seed: int
    #: Batches this rank has consumed.
    batches: int = 0
    #: Per logical worker: [epoch, block_start, emitted] after its last consumed batch.
    cursors: list[list[int]] = field(default_factory=list)
    #: Per logical worker: "epoch:shard" of each bad shard skipped (data.on_bad_shard=skip).
    skipped: list[list[str]] = field(default_factory=list)
    #: sha256 of the training shards' list; a checkpoint only resumes on the same data.
    data_id: str = ""


def _hash(hasher: Any, tokens: np.ndarray, eos: int | None) -> np.ndarray | None:
    if hasher is None:
        return None
    return np.ascontiguousarray(hasher.hash_numpy(tokens[:, :-1], doc_boundary_token=eos), dtype=np.int64)


@dataclass
class _WorkerBatch:
    """What a worker sends: numpy arrays inside a plain object, so DataLoader pickles them through its queue.

    Tensors would instead go through one shared-memory segment each, which costs ~10x more per batch
    than the batch is worth at these sizes (measured in bench/loader.py).
    """

    worker: int
    tokens: np.ndarray
    hash_ids: np.ndarray | None
    cursor: list[int]
    skipped: list[str]
    #: ``UniqueIds`` of ``hash_ids`` as numpy (unique, inverse): the table lookup's dedup, done here
    #: in the worker process rather than on the trainer's critical path.
    hash_unique: tuple[np.ndarray, np.ndarray] | None = None


def _batches(stream: RowStream, worker: int, batch_size: int, hasher: Any, eos: int | None) -> Iterator[_WorkerBatch]:
    rows: list[np.ndarray] = []
    for row, cursor in stream:
        rows.append(row)
        if len(rows) == batch_size:
            tokens = np.stack(rows)
            rows = []
            hash_ids = _hash(hasher, tokens, eos)
            unique = None if hash_ids is None else UniqueIds.of(torch.from_numpy(hash_ids))
            yield _WorkerBatch(worker, tokens, hash_ids, list(cursor), list(stream.skipped),
                               None if unique is None else (unique.unique.numpy(), unique.inverse.numpy()))


class _TrainStreams(IterableDataset):
    """The rank's logical workers, one per DataLoader worker (or one in-process with num_workers=0)."""

    def __init__(self, spec: StreamSpec, state: LoaderState, batch_size: int, hasher: Any, eos: int | None):
        self.spec, self.state, self.batch_size, self.hasher, self.eos = spec, state, batch_size, hasher, eos

    def __iter__(self):
        info = get_worker_info()
        slot = info.id if info is not None else 0
        worker = (slot + self.state.batches) % self.state.workers
        stream = RowStream(self.spec, worker, tuple(self.state.cursors[worker]), self.state.skipped[worker])
        yield from _batches(stream, worker, self.batch_size, self.hasher, self.eos)


class TrainLoader:
    """Infinite, resumable iterator of ``{"tokens": [B, T+1], "hash_ids": [B, T, L, H] | None,
    "hash_unique": UniqueIds | None}``."""

    def __init__(self, dataset: Dataset, spec: StreamSpec, state: LoaderState, batch_size: int, num_workers: int,
                 hasher: Any, eos: int | None):
        self.dataset, self.spec, self.state = dataset, spec, state
        self.batch_size, self.num_workers, self.hasher, self.eos = batch_size, num_workers, hasher, eos
        self._it: Iterator | None = None
        #: ``state.batches`` when the workers were last restarted after a death (a second death there is fatal).
        self._restarted_at: int | None = None
        #: How the current workers' dead one ended, once noticed; ``_in_next``: waiting for a batch.
        self._worker_death: str | None = None
        self._in_next = False

    def _start(self) -> Iterator:
        streams = _TrainStreams(self.spec, self.state, self.batch_size, self.hasher, self.eos)
        if self.num_workers == 0:
            return iter(streams)
        loader = DataLoader(streams, batch_size=None, num_workers=self.num_workers, prefetch_factor=4,
                            worker_init_fn=partial(_init_worker, os.getpid()))
        on_main_thread = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGCHLD) if on_main_thread else None
        with stop_signals_blocked():  # a signal to the process group must not reach a worker before its init
            iterator = iter(loader)
        if on_main_thread:
            _watch_worker_deaths(self, before)
        return iterator

    def _notice_dead_workers(self) -> None:
        """From the SIGCHLD handler: remember a dead worker; inside ``next`` also interrupt the wait for its batch.

        torch's own handler raises wherever the trainer happens to be (inside a collective, a checkpoint save),
        and without any handler a worker killed while writing a batch leaves half a message in the queue, on
        which the trainer would block forever.
        """
        if self._worker_death is not None:
            return
        dead = [w for w in getattr(self._it, "_workers", ()) if w.exitcode not in (None, 0)]
        if dead:
            self._worker_death = ", ".join(_describe_exit(w) for w in dead)
            if self._in_next:
                raise _WorkerDied(self._worker_death)

    def _next_batch(self) -> _WorkerBatch:
        while True:
            if self._it is None:
                self._it = self._start()
            if self._worker_death is None:
                self._in_next = True
                try:
                    return next(self._it)
                except _WorkerDied:
                    pass
                except RuntimeError as error:  # torch's periodic check found the death first
                    if "DataLoader worker" not in str(error):
                        raise
                    self._worker_death = self._worker_death or str(error)
                finally:
                    self._in_next = False
            self._restart_after_worker_death()

    def _restart_after_worker_death(self) -> None:
        """Replace the workers at the consumed position (the state holds no prefetched batch: the order is exact)."""
        dead, at = self._worker_death, self.state.batches
        if self._restarted_at == at:
            raise DataError(f"data: loader worker {dead} died again at batch {at} right after a restart; its error is in "
                            "this log above. If it was killed for memory (SIGKILL), lower data.num_workers or "
                            "experiment.micro_batch_size; relaunch to resume from the newest checkpoint")
        log.warning("data: loader worker %s died at batch %d; restarting the workers at that position (the data order "
                    "is unchanged)", dead, at)
        self._restarted_at = at
        self.close()

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor | None]:
        batch = self._next_batch()
        expected = self.state.batches % self.state.workers
        if batch.worker != expected:
            raise RuntimeError(f"loader: batch {self.state.batches} came from worker {batch.worker}, expected {expected}; "
                               "the DataLoader no longer hands out batches round-robin, so resume would not be exact")
        self.state.batches += 1
        self.state.cursors[batch.worker] = [int(c) for c in batch.cursor]
        self.state.skipped[batch.worker] = list(batch.skipped)
        hash_ids = None if batch.hash_ids is None else torch.from_numpy(batch.hash_ids)
        unique = None if batch.hash_unique is None else UniqueIds(*(torch.from_numpy(a) for a in batch.hash_unique))
        return {"tokens": torch.from_numpy(batch.tokens), "hash_ids": hash_ids, "hash_unique": unique}

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, Any] | LoaderState) -> None:
        saved = LoaderState(**state) if isinstance(state, dict) else state
        now = self.state
        if (saved.dp_world, saved.workers) != (now.dp_world, now.workers):
            raise DataError(
                f"data: the checkpoint's loader ran {saved.dp_world} data-parallel ranks x {saved.workers} workers, this run "
                f"has {now.dp_world} x {now.workers}; each (rank, worker) owns a different share of the shards, so the data "
                f"order cannot continue exactly. Resume with the same data-parallel size and data.num_workers="
                f"{saved.workers}, or start a new run_dir.")
        if saved.dp_rank != now.dp_rank:
            raise DataError(f"data: loader state of dp rank {saved.dp_rank} loaded on dp rank {now.dp_rank}; save one state per rank")
        if saved.data_id != now.data_id:
            raise DataError(f"data: the checkpoint was trained on other shards (data id {saved.data_id[:12]}, now "
                            f"{now.data_id[:12]}); resume on the same data.path or start a new run_dir")
        if saved.seed != now.seed:
            raise DataError(f"data: the checkpoint shuffled with seed {saved.seed}, this run uses {now.seed}; keep experiment.seed")
        self.close()
        self.state = saved

    def stats(self) -> dict[str, int]:
        """Numbers for metrics: epoch (of the slowest worker), batches, bad shards (distinct: those found bad while
        reading, and from the start those the start-up checksums found, before reading reaches them) and skips
        (per epoch, as reading passes them)."""
        skips = {tag for worker in self.state.skipped for tag in worker}
        train_shards = {shard.name for shard in self.spec.shards}
        known_bad = {name for name in self.spec.bad if name in train_shards}
        return {
            "data/epoch": min(c[0] for c in self.state.cursors),
            "data/batches": self.state.batches,
            "data/bad_shards": len({tag.split(":", 1)[1] for tag in skips} | known_bad),
            "data/bad_shard_skips": len(skips),
        }

    def close(self) -> None:
        """Stop the worker processes (a new iterator starts on the next ``next``)."""
        workers = list(getattr(self._it, "_workers", ()))
        self._it, self._worker_death = None, None  # torch's shutdown: the workers see it and exit
        _kill(workers)  # any that did not (they ignore the SIGTERM torch would follow up with)


def _init_worker(trainer_pid: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGTERM/SIGUSR1/SIGUSR2/SIGINT to the trainer, and die with it.

    torch's own SIGTERM handler in the worker exits on any sender's SIGTERM, so a ``scancel`` or a preemption
    (which signal the whole process group) would kill the worker under the trainer's preemption checkpoint.
    """
    ignore_stop_signals_and_die_with_parent(trainer_pid)


class _WorkerDied(Exception):
    """Raised by the SIGCHLD handler into a ``next`` that waits for a dead worker's batch."""


_watched_loaders: weakref.WeakSet[TrainLoader] = weakref.WeakSet()
_chained_sigchld = None


def _on_sigchld(signum, frame) -> None:
    for loader in list(_watched_loaders):
        loader._notice_dead_workers()
    if _chained_sigchld is not None:
        _chained_sigchld(signum, frame)


def _watch_worker_deaths(loader: TrainLoader, before) -> None:
    """Install our SIGCHLD handler in place of the one torch installs with the first DataLoader iterator
    (``before``: the handler before that iterator, which ours chains to)."""
    global _chained_sigchld
    _watched_loaders.add(loader)
    if before is not _on_sigchld:
        _chained_sigchld = before if callable(before) else None
    signal.signal(signal.SIGCHLD, _on_sigchld)


def _kill(workers) -> None:
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


@atexit.register
def _kill_workers_at_exit() -> None:
    """Runs before multiprocessing's exit hook (registered earlier), which would SIGTERM the workers and join
    them: they ignore SIGTERM, so a trainer leaving with an exception (its frames keep the loader alive) would
    wait forever."""
    for loader in list(_watched_loaders):
        _kill(list(getattr(loader._it, "_workers", ())))


def _describe_exit(process) -> str:
    code = process.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return f"pid {process.pid} ({how})"


def _data_id(dataset: Dataset) -> str:
    return hashlib.sha256("".join(s.sha256 for s in dataset.train).encode()).hexdigest()


def build_train_loader(data_cfg: Any, *, micro_batch_size: int, hasher: Any, dp_rank: int, dp_world: int, seed: int,
                       eos_reset: bool = False, dataset: Dataset | None = None) -> TrainLoader:
    """The rank's training loader, from the start of epoch 0 (``load_state_dict`` to resume)."""
    dataset = dataset or open_dataset(data_cfg)
    workers = max(1, data_cfg.num_workers)
    if len(dataset.train) < dp_world * workers:
        need = dp_world * workers
        raise DataError(f"data.shards: {len(dataset.train)} shards cannot feed {dp_world} ranks x {workers} workers; "
                        f"write at least {need} shards (python -m data_pipelines.prepare --out {data_cfg.path} --shards {need}) "
                        f"or lower data.num_workers")
    spec = StreamSpec(dataset.train, dataset.seq_len, dataset.vocab_size, seed, dp_rank, dp_world, workers,
                      data_cfg.shuffle_buffer, data_cfg.on_bad_shard, str(data_cfg.path), dict(dataset.bad))
    state = LoaderState(dp_world, dp_rank, workers, seed, cursors=[[0, 0, 0] for _ in range(workers)],
                        skipped=[[] for _ in range(workers)], data_id=_data_id(dataset))
    return TrainLoader(dataset, spec, state, micro_batch_size, data_cfg.num_workers, hasher, dataset.eos_id if eos_reset else None)


class ValLoader:
    """Deterministic, finite: the validation rows in manifest order, full batches dealt round-robin to ranks.

    Every rank gets the same number of batches (so collective evaluation never waits on a missing
    batch); the rows that cannot fill one more batch on every rank are left out and counted in
    ``rows_left_out``. Each ``iter()`` starts again from the first row.
    """

    def __init__(self, dataset: Dataset, data_cfg: Any, batch_size: int, hasher: Any, dp_rank: int, dp_world: int, eos: int | None):
        self.dataset, self.cfg, self.batch_size, self.hasher = dataset, data_cfg, batch_size, hasher
        self.dp_rank, self.dp_world, self.eos = dp_rank, dp_world, eos
        total = sum(s.sequences for s in dataset.val if s.name not in dataset.bad)
        self.batches_per_rank = total // (batch_size * dp_world)
        self.rows_left_out = total - self.batches_per_rank * batch_size * dp_world
        if self.batches_per_rank == 0:
            raise DataError(f"data: the validation split has {total} sequences, fewer than micro_batch_size={batch_size} x "
                            f"{dp_world} ranks; prepare more validation text (--val-max-mb) in {PREPARE_HINT.format(path=data_cfg.path)}")

    def __len__(self) -> int:
        return self.batches_per_rank

    def _rows(self) -> Iterator[np.ndarray]:
        for shard in self.dataset.val:
            if shard.name in self.dataset.bad:
                continue
            try:
                for rows in read_shard(shard, seq_len=self.dataset.seq_len, vocab_size=self.dataset.vocab_size):
                    yield from rows
            except BadShard as bad:
                if self.cfg.on_bad_shard != "skip":
                    raise DataError(f"{bad}. Re-run {PREPARE_HINT.format(path=self.cfg.path)} --force, or set "
                                    "data.on_bad_shard=skip") from None
                log.warning("skipping bad validation shard: %s (data.on_bad_shard=skip)", bad)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | None]]:
        rows: list[np.ndarray] = []
        index = 0
        for row in self._rows():
            rows.append(row)
            if len(rows) < self.batch_size:
                continue
            if index // self.dp_world >= self.batches_per_rank:
                return
            if index % self.dp_world == self.dp_rank:
                tokens = np.stack(rows)
                hash_ids = _hash(self.hasher, tokens, self.eos)
                yield {"tokens": torch.from_numpy(tokens), "hash_ids": None if hash_ids is None else torch.from_numpy(hash_ids)}
            rows, index = [], index + 1


def build_val_loader(data_cfg: Any, micro_batch_size: int, hasher: Any = None, *, dp_rank: int = 0, dp_world: int = 1,
                     eos_reset: bool = False, dataset: Dataset | None = None) -> ValLoader:
    dataset = dataset or open_dataset(data_cfg)
    if not dataset.val:
        raise DataError(f"data: {data_cfg.path}/manifest.json lists no validation shards; rebuild with {PREPARE_HINT.format(path=data_cfg.path)} --force")
    return ValLoader(dataset, data_cfg, micro_batch_size, hasher, dp_rank, dp_world, dataset.eos_id if eos_reset else None)
