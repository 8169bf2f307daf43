"""Training and validation loaders: batches of packed rows plus their Engram hash ids.

The run reads one *global* sequence of micro-batches, the same whatever the data-parallel size of the
launch that reads it, so a checkpoint resumes exactly at another size:

1. the row streams are fixed when the run starts: ``data.streams`` of them, or where that is 0 ``ranks x
   workers`` (the first launch's data-parallel ranks and ``max(1, data.num_workers)``), stream ``k`` reading
   the shards and shuffle of (rank ``k % ranks``, worker ``k // ranks``) (``stream.assign_shards``; with
   ``data.streams`` set, ranks = streams and workers = 1), cut into micro-batches of ``micro_batch_size``
   rows across epoch boundaries, so no row is dropped or repeated. Two runs with the same ``data.streams``
   thus read the same order whatever their sizes;
2. global micro-batch ``g`` is the next micro-batch of stream ``g % streams``, and data-parallel rank ``r``
   of a launch with ``D`` ranks consumes ``g = r, r + D, r + 2D, ...``: every optimizer step takes the same
   micro-batches at any ``D`` that divides its micro-batches (``StepPlan`` checks that), only the ranks
   that compute them change. At the starting layout each rank reads its own streams; at another, a rank
   (or worker) whose micro-batches share a stream with others reads that stream and drops theirs (logged);
3. a rank's micro-batch ``n`` comes from its DataLoader worker ``n % num_workers`` (torch hands out batches
   of an IterableDataset round-robin over its workers, and we check it does); a worker keeps a reader for
   each stream its micro-batches come from;
4. the state (``LoaderState``) is the global position: micro-batches consumed by all ranks, and per stream
   the cursor after its newest consumed micro-batch and that micro-batch's index. Batches prefetched but not
   consumed are not part of it, so they are simply produced again after a resume. Each rank updates the
   streams it consumes; a checkpoint gathers every rank's view (``global_state_dict``) and keeps, per
   stream, the newest cursor.

The cursors are row positions, so a checkpoint taken with another ``micro_batch_size`` still resumes without
a row lost or repeated (the grouping into micro-batches then differs from an uninterrupted run).
Checkpoints written before the global state (one state per rank, cursors per (rank, worker)) are converted
exactly: they describe the same streams.

Hash ids are computed in the workers (the trainer then only does table lookups).

The workers are the trainer's helpers: they ignore the scheduler's stop signals (the trainer alone checkpoints
and exits on them), die with the trainer (a ``kill -9`` of a rank leaves nothing that holds its sockets), and
a worker that dies anyway (the OOM killer, a stray ``kill``) is restarted at the consumed position, which
keeps the data order exact.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import logging
import math
import os
import signal
import threading
import weakref
from collections.abc import Iterator
import copy
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from engram_train.data.manifest import PREPARE_HINT, DataError, Dataset, open_dataset
from engram_train.data.stream import BadShard, RowStream, StreamSpec, read_shard
from engram_train.memory.dedup import UniqueIds
from engram_train.preemption import ignore_stop_signals_and_die_with_parent, stop_signals_blocked

log = logging.getLogger(__name__)


@dataclass
class LoaderState:
    """The run's position in its global order of micro-batches; plain types (``weights_only``, JSON).

    A rank's own copy is exact for the streams it consumes; ``merge_states`` of every rank's copy is the
    global position a checkpoint holds, which any data-parallel size resumes.
    """

    #: The stream layout, fixed when the run started: that launch's data-parallel ranks x logical workers.
    ranks: int
    workers: int
    seed: int
    #: Global micro-batches consumed by all ranks together (on a rank: once every rank has caught up with it).
    batches: int = 0
    #: Per stream: [epoch, block_start, emitted] after its newest consumed micro-batch.
    cursors: list[list[int]] = field(default_factory=list)
    #: Per stream: the global index of that micro-batch (-1: none consumed yet).
    last: list[int] = field(default_factory=list)
    #: Per stream: "epoch:shard" of each bad shard skipped (data.on_bad_shard=skip).
    skipped: list[list[str]] = field(default_factory=list)
    #: sha256 of the training shards' list; a checkpoint only resumes on the same data.
    data_id: str = ""

    @property
    def streams(self) -> int:
        return self.ranks * self.workers

    @classmethod
    def start(cls, ranks: int, workers: int, seed: int, data_id: str) -> "LoaderState":
        streams = ranks * workers
        return cls(ranks, workers, seed, cursors=[[0, 0, 0] for _ in range(streams)], last=[-1] * streams,
                   skipped=[[] for _ in range(streams)], data_id=data_id)

    @classmethod
    def from_rank_states(cls, states: list[dict[str, Any]]) -> "LoaderState":
        """The global position of a checkpoint written before it existed: one state per data-parallel rank,
        ``cursors[w]`` of (rank, worker w), ``batches`` per rank. Stream ``w * ranks + rank`` is that (rank, worker)."""
        ranks, workers = states[0]["dp_world"], states[0]["workers"]
        by_rank = {s["dp_rank"]: s for s in states}
        if sorted(by_rank) != list(range(ranks)) or len({s["batches"] for s in states}) != 1:
            raise DataError(f"data: the checkpoint's per-rank loader states cover dp ranks {sorted(by_rank)} of {ranks} at "
                            f"batches {sorted({s['batches'] for s in states})}, not one position; resume from another "
                            "checkpoint (rename this one step_<n>.damaged) or start a new run_dir")
        state = cls.start(ranks, workers, states[0]["seed"], states[0]["data_id"])
        state.batches = by_rank[0]["batches"] * ranks
        for k in range(state.streams):
            old = by_rank[k % ranks]
            state.cursors[k] = list(old["cursors"][k // ranks])
            state.skipped[k] = list(old["skipped"][k // ranks])
            state.last[k] = k + (state.batches - 1 - k) // state.streams * state.streams if state.batches > k else -1
        return state


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The global position from every rank's copy: per stream, the cursor of its newest consumed micro-batch."""
    views = [LoaderState(**s) for s in copy.deepcopy(states)]
    if len({(v.ranks, v.workers, v.seed, v.batches, v.data_id) for v in views}) != 1:
        raise DataError("data: ranks disagree on the loader position "
                        f"{sorted({(v.ranks, v.workers, v.batches) for v in views})}; they must save at the same step")
    merged = views[0]
    for k in range(merged.streams):
        newest = max(views, key=lambda v: v.last[k])
        merged.cursors[k], merged.last[k], merged.skipped[k] = newest.cursors[k], newest.last[k], newest.skipped[k]
    return asdict(merged)


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

    #: Global index of the micro-batch, and its stream.
    index: int
    stream: int
    tokens: np.ndarray
    hash_ids: np.ndarray | None
    cursor: list[int]
    skipped: list[str]
    #: ``UniqueIds`` of ``hash_ids`` as numpy (unique, inverse): the table lookup's dedup, done here
    #: in the worker process rather than on the trainer's critical path.
    hash_unique: tuple[np.ndarray, np.ndarray] | None = None


class _StreamReader:
    """One stream cut into micro-batches; its micro-batch ``j`` is global micro-batch ``j * streams + k``."""

    def __init__(self, stream: RowStream, next_batch: int, batch_size: int):
        self.stream, self.rows, self.next, self.batch_size = stream, iter(stream), next_batch, batch_size

    def _take(self) -> np.ndarray:
        return np.stack([next(self.rows)[0] for _ in range(self.batch_size)])

    def batch(self, j: int) -> np.ndarray:
        """The stream's micro-batch ``j``; those before it that other ranks or workers consume are read and dropped."""
        assert j >= self.next, (j, self.next)
        while self.next < j:
            self._take()
            self.next += 1
        self.next += 1
        return self._take()


class _TrainStreams(IterableDataset):
    """This rank's micro-batches ``first, first + stride, ...`` dealt round-robin to its DataLoader workers
    (one in-process with num_workers=0)."""

    def __init__(self, spec: StreamSpec, state: LoaderState, first: int, stride: int, batch_size: int, hasher: Any,
                 eos: int | None):
        self.spec, self.state, self.first, self.stride = spec, state, first, stride
        self.batch_size, self.hasher, self.eos = batch_size, hasher, eos

    def _reader(self, k: int) -> _StreamReader:
        s = self.state
        spec = replace(self.spec, rank=k % s.ranks)
        stream = RowStream(spec, k // s.ranks, tuple(s.cursors[k]), s.skipped[k])
        return _StreamReader(stream, s.last[k] // s.streams + 1 if s.last[k] >= 0 else 0, self.batch_size)

    def __iter__(self):
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers: dict[int, _StreamReader] = {}
        index, streams = self.first + slot * self.stride, self.state.streams
        while True:
            k = index % streams
            reader = readers.get(k) or readers.setdefault(k, self._reader(k))
            tokens = reader.batch(index // streams)
            hash_ids = _hash(self.hasher, tokens, self.eos)
            unique = None if hash_ids is None else UniqueIds.of(torch.from_numpy(hash_ids))
            yield _WorkerBatch(index, k, tokens, hash_ids, list(reader.stream.cursor), list(reader.stream.skipped),
                               None if unique is None else (unique.unique.numpy(), unique.inverse.numpy()))
            index += workers * self.stride


class TrainLoader:
    """Infinite, resumable iterator of ``{"tokens": [B, T+1], "hash_ids": [B, T, L, H] | None,
    "hash_unique": UniqueIds | None}``."""

    def __init__(self, dataset: Dataset, spec: StreamSpec, state: LoaderState, batch_size: int, num_workers: int,
                 hasher: Any, eos: int | None, *, dp_rank: int = 0, dp_world: int = 1):
        self.dataset, self.spec, self.state = dataset, spec, state
        self.batch_size, self.num_workers, self.hasher, self.eos = batch_size, num_workers, hasher, eos
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self._it: Iterator | None = None
        #: ``state.batches`` when the workers were last restarted after a death (a second death there is fatal).
        self._restarted_at: int | None = None
        #: How the current workers' dead one ended, once noticed; ``_in_next``: waiting for a batch.
        self._worker_death: str | None = None
        self._in_next = False

    def _next_index(self) -> int:
        """Global index of this rank's next micro-batch: ``state.batches`` counts whole rounds of every rank's."""
        return self.state.batches + self.dp_rank

    def _start(self) -> Iterator:
        _check_enough_shards(len(self.spec.shards), self.state, self.spec.path)
        # The workers get a copy of the position as it is now (the trainer goes on updating its own).
        streams = _TrainStreams(self.spec, copy.deepcopy(self.state), self._next_index(), self.dp_world,
                                self.batch_size, self.hasher, self.eos)
        if self.num_workers == 0:
            return iter(streams)
        loader = DataLoader(streams, batch_size=None, num_workers=self.num_workers, prefetch_factor=4,
                            worker_init_fn=partial(_init_worker, os.getpid()))
        on_main_thread = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGCHLD) if on_main_thread else None
        # gc.freeze: the workers are forked from a process with threads (gloo, W&B, the prefetcher), and a garbage
        # collection in a worker would run the destructors of this process's unreachable objects there: a dropped
        # gloo group joins threads that do not exist in the child, which crashed (SIGSEGV) or hung the worker
        # (seen in the test suite). Frozen objects are never collected in the child; here they are again after.
        with stop_signals_blocked(), _frozen_gc():  # a signal to the process group must not reach a worker before its init
            iterator = iter(loader)
        _live_workers.difference_update([w for w in _live_workers if not w.is_alive()])
        _live_workers.update(getattr(iterator, "_workers", ()))
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
        expected = self._next_index()
        if batch.index != expected:
            raise RuntimeError(f"loader: dp rank {self.dp_rank} got global micro-batch {batch.index}, expected {expected}; the "
                               "DataLoader no longer hands out batches round-robin, so resume would not be exact")
        self.state.batches += self.dp_world
        k = batch.stream
        self.state.cursors[k], self.state.last[k] = [int(c) for c in batch.cursor], batch.index
        self.state.skipped[k] = list(batch.skipped)
        hash_ids = None if batch.hash_ids is None else torch.from_numpy(batch.hash_ids)
        unique = None if batch.hash_unique is None else UniqueIds(*(torch.from_numpy(a) for a in batch.hash_unique))
        return {"tokens": torch.from_numpy(batch.tokens), "hash_ids": hash_ids, "hash_unique": unique}

    def state_dict(self) -> dict[str, Any]:
        """This rank's copy of the position (the global position in a one-rank run); see ``global_state_dict``."""
        return asdict(self.state)

    def global_state_dict(self) -> dict[str, Any]:
        """Collective over every rank (at a step boundary): the global position, which any data-parallel size resumes."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.state_dict()
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state_dict())
        return merge_states(states)

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Resume from a global position (or, from older checkpoints, the list of every dp rank's state)."""
        state = copy.deepcopy(state)  # the caller's lists stay as they are
        saved = LoaderState.from_rank_states(state) if isinstance(state, list) else LoaderState(**state)
        now = self.state
        if saved.data_id != now.data_id:
            raise DataError(f"data: the checkpoint was trained on other shards (data id {saved.data_id[:12]}, now "
                            f"{now.data_id[:12]}); resume on the same data.path or start a new run_dir")
        if saved.seed != now.seed:
            raise DataError(f"data: the checkpoint shuffled with seed {saved.seed}, this run uses {now.seed}; keep experiment.seed")
        _check_enough_shards(len(self.spec.shards), saved, self.spec.path)
        self.close()
        self.state = saved
        self.spec = replace(self.spec, world=saved.ranks, workers=saved.workers)
        readers = self.dp_world * max(1, self.num_workers)
        reads = readers // math.gcd(readers, saved.streams)
        if reads > 1:
            log.warning("data: this run continues the order of %d streams (%d ranks x %d workers) on %d ranks x %d workers: "
                        "streams are shared, so each worker reads %dx the rows it keeps; data-parallel sizes whose ranks x "
                        "workers divide %d read each row once", saved.streams, saved.ranks, saved.workers, self.dp_world,
                        max(1, self.num_workers), reads, saved.streams)

    def stats(self) -> dict[str, int]:
        """Numbers for metrics: epoch (of this rank's slowest stream), global micro-batches, bad shards (distinct:
        those found bad while reading, and from the start those the start-up checksums found, before reading
        reaches them) and skips (per epoch, as reading passes them)."""
        s = self.state
        mine = {(s.batches + self.dp_rank + i * self.dp_world) % s.streams for i in range(s.streams)}
        skips = {tag for stream in s.skipped for tag in stream}
        train_shards = {shard.name for shard in self.spec.shards}
        known_bad = {name for name in self.spec.bad if name in train_shards}
        return {
            "data/epoch": min(s.cursors[k][0] for k in mine),
            "data/batches": s.batches,
            "data/bad_shards": len({tag.split(":", 1)[1] for tag in skips} | known_bad),
            "data/bad_shard_skips": len(skips),
        }

    def worker_pids(self) -> list[int]:
        """The current worker processes (none before the first batch, or with ``num_workers=0``)."""
        return [w.pid for w in getattr(self._it, "_workers", ())]

    def close(self) -> None:
        """Stop the worker processes (a new iterator starts on the next ``next``)."""
        workers = list(getattr(self._it, "_workers", ()))
        self._it, self._worker_death = None, None  # torch's shutdown: the workers see it and exit
        _kill(workers)  # any that did not (they ignore the SIGTERM torch would follow up with)


@contextlib.contextmanager
def _frozen_gc():
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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


#: Every worker process started here and not yet killed, whatever became of its loader.
_live_workers: set = set()


def _kill(workers) -> None:
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)
        _live_workers.discard(worker)


@atexit.register
def _kill_workers_at_exit() -> None:
    """Runs before multiprocessing's exit hook (imported by torch, so registered earlier), which SIGTERMs the
    workers and then joins them without a timeout: they ignore SIGTERM, so one still alive would hold the exit
    forever. That happens whenever torch's own shutdown did not reach a worker (a loader left with an exception,
    a worker stuck after its sibling died), so every worker ever started is killed here, not only those of
    loaders still referenced."""
    _kill(list(_live_workers))


def _describe_exit(process) -> str:
    code = process.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return f"pid {process.pid} ({how})"


def _data_id(dataset: Dataset) -> str:
    return hashlib.sha256("".join(s.sha256 for s in dataset.train).encode()).hexdigest()


def _check_enough_shards(shards: int, state: LoaderState, path: str) -> None:
    if shards < state.streams:
        raise DataError(f"data.shards: {shards} shards cannot feed {state.streams} row streams; write at least "
                        f"{state.streams} shards (python -m data_pipelines.prepare --out {path} --shards {state.streams}) or "
                        "read fewer streams: data.streams, or where that is 0 (streams = the first launch's data-parallel "
                        "ranks x workers) data.num_workers")


def build_train_loader(data_cfg: Any, *, micro_batch_size: int, hasher: Any, dp_rank: int, dp_world: int, seed: int,
                       eos_reset: bool = False, dataset: Dataset | None = None) -> TrainLoader:
    """The rank's training loader, from the start of epoch 0 with this launch's streams (``load_state_dict`` to
    resume; the shard count is checked against the streams read, at the first batch)."""
    dataset = dataset or open_dataset(data_cfg)
    # data.streams fixes the layout whatever this launch's size: stream k is then "rank" k of one worker.
    ranks, workers = (data_cfg.streams, 1) if data_cfg.streams else (dp_world, max(1, data_cfg.num_workers))
    spec = StreamSpec(dataset.train, dataset.seq_len, dataset.vocab_size, seed, dp_rank % ranks, ranks, workers,
                      data_cfg.shuffle_buffer, data_cfg.on_bad_shard, str(data_cfg.path), dict(dataset.bad))
    state = LoaderState.start(ranks, workers, seed, _data_id(dataset))
    return TrainLoader(dataset, spec, state, micro_batch_size, data_cfg.num_workers, hasher,
                       dataset.eos_id if eos_reset else None, dp_rank=dp_rank, dp_world=dp_world)


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
