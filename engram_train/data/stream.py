"""Reading packed rows out of shards, and the resumable per-worker stream of rows.

A *stream* is what one loader worker of one data-parallel rank reads: in epoch e, the shards are
permuted by (seed, e) and stream (rank, worker) takes ``perm[rank::world][worker::workers]``. Every
shard belongs to exactly one stream per epoch, so ranks x workers together read each row once.

A stream's position is a *cursor* ``(epoch, block_start, emitted)``: rows are shuffled in blocks of
``shuffle_buffer`` consecutive samples (permuted by (seed, epoch, rank, worker, block_start)), and
``emitted`` rows of the block at sample ``block_start`` have been handed out. Resuming skips whole
shards by the manifest's sample counts, reads (without decoding) up to ``block_start``, re-reads one
block and drops ``emitted`` rows: exact, and at most one shard plus one block of extra reading.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import webdataset as wds

from engram_train.data.manifest import PREPARE_HINT, DataError, ShardInfo

log = logging.getLogger(__name__)

Cursor = tuple[int, int, int]


class BadShard(Exception):
    """A shard is unreadable or its contents break the manifest's promises."""

    def __init__(self, shard: ShardInfo, problem: str):
        super().__init__(f"shard {shard.url}: {problem}")
        self.shard, self.problem = shard, problem


def _raise_bad(shard: ShardInfo):
    """wds handler: every tar/IO error becomes BadShard naming the shard (wds would otherwise just log or stop)."""

    def handler(exn: Exception) -> bool:
        raise BadShard(shard, f"cannot be read as a tar file ({type(exn).__name__}: {exn}); it is truncated or corrupt")

    return handler


def read_shard(shard: ShardInfo, *, seq_len: int, vocab_size: int, skip: int = 0) -> Iterator[np.ndarray]:
    """Rows arrays ([n, seq_len + 1], int64) of the shard's samples after the first ``skip``.

    Checks what the manifest promises: sample count, row shape and token range. Skipped samples are
    read but not decoded, which is what makes resuming inside a large shard cheap.
    """
    dataset = wds.WebDataset(
        shard.url, shardshuffle=False, nodesplitter=None, workersplitter=None, handler=_raise_bad(shard), empty_check=False
    )
    count = 0
    rows_seen = 0
    for sample in dataset:
        count += 1
        if count > shard.samples:
            raise BadShard(shard, f"has more than the {shard.samples} samples manifest.json lists")
        if "tokens.npy" not in sample:
            raise BadShard(shard, f"sample {sample.get('__key__')!r} has no field tokens.npy (fields: {sorted(k for k in sample if not k.startswith('__'))})")
        if count <= skip:
            continue
        try:
            rows = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        except Exception as exn:  # noqa: BLE001 - any decoding failure means corrupt bytes
            raise BadShard(shard, f"sample {sample['__key__']!r} field tokens.npy is not a valid .npy array ({exn})") from None
        if rows.ndim != 2 or rows.shape[1] != seq_len + 1 or rows.dtype.kind not in "iu":
            raise BadShard(shard, f"sample {sample['__key__']!r} field tokens.npy has shape {rows.shape} dtype {rows.dtype}; "
                                  f"expected integer [n, {seq_len + 1}]")
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= vocab_size):
            raise BadShard(shard, f"sample {sample['__key__']!r} field tokens.npy holds token ids in [{rows.min()}, {rows.max()}], "
                                  f"outside the vocabulary [0, {vocab_size}): written with another tokenizer")
        rows_seen += len(rows)
        yield rows.astype(np.int64)
    if count != shard.samples:
        raise BadShard(shard, f"ended after {count} of the {shard.samples} samples manifest.json lists; it is truncated")


def assign_shards(num_shards: int, *, seed: int, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[int]:
    """Shard indices of stream (rank, worker) in ``epoch``; a partition of all shards over the streams."""
    perm = np.random.default_rng([seed, epoch, 0xDA7A]).permutation(num_shards)
    return perm[rank::world][worker::workers].tolist()


@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild its stream from a cursor (picklable, sent to workers)."""

    shards: list[ShardInfo]
    seq_len: int
    vocab_size: int
    seed: int
    rank: int
    world: int
    workers: int
    shuffle_buffer: int
    on_bad_shard: str
    #: data.path, for the fix in error messages.
    path: str = "<data.path>"
    #: Shards known bad before reading (sha256 mismatch with data.on_bad_shard=skip).
    bad: dict[str, str] = field(default_factory=dict)


class RowStream:
    """Infinite rows of one logical worker, with the cursor after each row and the shards it skipped."""

    def __init__(self, spec: StreamSpec, worker: int, cursor: Cursor, skipped: list[str]):
        self.spec, self.worker = spec, worker
        self.cursor: Cursor = tuple(cursor)
        #: "epoch:shard" of every bad shard skipped, so a resumed worker does not count one twice.
        self.skipped: list[str] = list(skipped)

    def _skip(self, epoch: int, shard: ShardInfo, problem: str) -> None:
        if self.spec.on_bad_shard != "skip":
            raise DataError(f"shard {shard.url}: {problem}. Re-run {PREPARE_HINT.format(path=self.spec.path)} --force, "
                            f"or set data.on_bad_shard=skip to train without it")
        tag = f"{epoch}:{shard.name}"
        if tag not in self.skipped:
            self.skipped.append(tag)
            log.warning("skipping bad shard %s in epoch %d: %s (data.on_bad_shard=skip)", shard.url, epoch, problem)

    def _samples(self, epoch: int, start: int) -> Iterator[tuple[int, np.ndarray]]:
        """(stream position after the sample, rows) from sample ``start`` of this epoch's stream.

        A bad shard counts as fully consumed: the position jumps to its end, identically on every replay.
        """
        s = self.spec
        order = assign_shards(len(s.shards), seed=s.seed, epoch=epoch, rank=s.rank, world=s.world, worker=self.worker, workers=s.workers)
        begin = 0
        for index in order:
            shard = s.shards[index]
            end = begin + shard.samples
            if start < end:
                if shard.name in s.bad:
                    self._skip(epoch, shard, s.bad[shard.name])
                else:
                    position = max(start, begin)
                    try:
                        for rows in read_shard(shard, seq_len=s.seq_len, vocab_size=s.vocab_size, skip=position - begin):
                            position += 1
                            yield position, rows
                    except BadShard as bad:
                        self._skip(epoch, shard, bad.problem)
            begin = end

    def __iter__(self) -> Iterator[tuple[np.ndarray, Cursor]]:
        s = self.spec
        epoch, block_start, emitted = self.cursor
        block_size = max(1, s.shuffle_buffer)
        while True:
            samples = self._samples(epoch, block_start)
            produced = False
            while True:
                block, position = [], block_start
                for position, rows in samples:
                    block.append(rows)
                    if len(block) == block_size:
                        break
                if not block:
                    break
                rows = np.concatenate(block)
                if s.shuffle_buffer > 0:
                    rows = rows[np.random.default_rng([s.seed, epoch, s.rank, self.worker, block_start]).permutation(len(rows))]
                for i in range(emitted, len(rows)):
                    self.cursor = (epoch, block_start, i + 1)
                    produced = True
                    yield rows[i], self.cursor
                block_start, emitted = position, 0
                self.cursor = (epoch, block_start, 0)
            if not produced and self.cursor == (epoch, 0, 0):
                raise DataError(f"data: every shard of rank {s.rank} worker {self.worker} in epoch {epoch} is bad or empty; "
                                f"nothing left to train on. Re-run {PREPARE_HINT.format(path=s.path)} --force")
            epoch, block_start, emitted = epoch + 1, 0, 0
            self.cursor = (epoch, 0, 0)
