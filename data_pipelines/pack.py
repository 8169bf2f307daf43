"""Tokenize documents in worker processes, pack the token stream into fixed-length rows, write shards.

Tokens are spooled to a flat binary file instead of held in lists, so memory stays at one chunk
per worker however large the corpus is; packing then reads the spool through ``np.memmap``.

Packing: documents are concatenated with EOS after each one and the stream is cut into rows of
``seq_len + 1`` tokens that overlap by one token (row i = stream[i*T : i*T + T + 1]), so every
token after the first is a training target exactly once. Only the final partial row is left out;
its size is recorded in the manifest. Many rows go into one tar sample (``tokens.npy``
[n_seq, seq_len + 1]) because tar headers cost ~9x a single 257-token row.
"""

from __future__ import annotations

import collections
import io
import json
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipelines.tokenizer import sha256_file

#: Text handed to a worker at once; large enough to amortise pickling, small enough to stream.
_CHUNK_CHARS = 1 << 20

_worker_tokenizer = None
_worker_eos = 0
_worker_dtype = np.uint16


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves shard size for vocabularies that fit (GPT-2's 50257 does)."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _init_worker(tokenizer_json: str, eos: int, dtype: str) -> None:
    global _worker_tokenizer, _worker_eos, _worker_dtype
    # One process per core already; the Rust thread pool inside each would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)
    _worker_eos = eos
    _worker_dtype = np.dtype(dtype)


def _encode(texts: list[str]) -> tuple[bytes, int]:
    pieces = []
    eos = np.array([_worker_eos], dtype=_worker_dtype)
    for enc in _worker_tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids, dtype=_worker_dtype))
        pieces.append(eos)
    return (np.concatenate(pieces).tobytes() if pieces else b""), sum(len(t) for t in texts)


def _chunks(docs_path: Path) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    with open(docs_path, encoding="utf-8") as f:
        for line in f:
            chunk.append(json.loads(line)["text"])
            size += len(chunk[-1])
            if size >= _CHUNK_CHARS:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(docs_path: Path, args: tuple, workers: int, desc: str) -> Iterator[tuple[bytes, int]]:
    """``_encode`` of every chunk, in order, on ``workers`` processes with at most two chunks each in flight.

    Workers come from a fork server (a fresh single-threaded process that has imported this module), not from a
    fork of the caller: forking a process with live threads (the tokenizers pool that trained the BPE, torch's, a
    test runner's) can crash the child (seen: a segfault while garbage-collecting, in the test suite), and a
    ``multiprocessing.Pool`` whose worker dies waits forever. Here a dead worker stops the run with its reason.
    """
    if workers <= 1:
        _init_worker(*args)
        yield from map(_encode, _chunks(docs_path))
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as before the fork server: later forks of this process stay quiet
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # imported once in the server, not in every worker
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=args) as pool:
            pending = collections.deque()
            for chunk in _chunks(docs_path):
                pending.append(pool.submit(_encode, chunk))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    except BrokenProcessPool as error:
        raise RuntimeError(f"{desc}: a tokenizer worker process died ({error}); rerun with --workers 1 to see "
                           f"its error in this process") from error


def tokenize_spool(
    docs_path: Path, tokens_path: Path, tokenizer_json: str, eos: int, dtype: np.dtype, workers: int, total_chars: int, desc: str
) -> int:
    """Encode every document of ``docs_path`` (jsonl) in order; returns the number of tokens written."""
    args = (tokenizer_json, eos, dtype.str)
    n_tokens = 0
    bar = tqdm(total=total_chars, unit="char", unit_scale=True, desc=desc, leave=False)
    with open(tokens_path, "wb") as out:
        for data, chars in _encoded_chunks(docs_path, args, workers, desc):
            out.write(data)
            n_tokens += len(data) // dtype.itemsize
            bar.update(chars)
    bar.close()
    return n_tokens


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def sequence_order(n_seq: int, split: str, seed: int) -> np.ndarray:
    """The seeded order in which a split's packed sequences are written (its inverse restores the stream)."""
    return np.random.default_rng([seed, len(split)]).permutation(n_seq)


def write_shards(
    tokens_path: Path, dtype: np.dtype, out_dir: Path, split: str, seq_len: int, seqs_per_sample: int, min_shards: int,
    seed: int = 0,
) -> dict:
    """Pack the spooled tokens into ``{split}-%06d.tar`` shards; returns the split's manifest entry.

    Samples are spread so there are at least ``min_shards`` shards of equal sample count (the last
    may be shorter): loader streams get shards, not samples, so equal shards balance the workers.
    Sequences are written in a seeded random order: documents arrive grouped by source (a dictionary
    is one long run of entries), and the loader only shuffles shards and a small sample buffer, so
    without this a short run would train on one source at a time and its loss curve would follow
    whichever source comes first rather than the model.
    """
    stream = np.memmap(tokens_path, dtype=dtype, mode="r") if tokens_path.stat().st_size else np.zeros(0, dtype)
    n_seq = max(0, (len(stream) - 1) // seq_len)
    if n_seq < min_shards:
        raise SystemExit(
            f"{split}: {len(stream)} tokens make only {n_seq} sequences of seq_len={seq_len}, fewer than the "
            f"{min_shards} shards asked for; add text (--max-mb, --source) or lower --shards/--val-shards"
        )
    per_sample = max(1, min(seqs_per_sample, n_seq // min_shards))
    n_samples = -(-n_seq // per_sample)
    per_shard = max(1, n_samples // min_shards)
    shards: list[dict] = []
    import webdataset as wds  # here, not at the top: tokenizer workers import this module and need no torch

    sink = wds.ShardWriter(str(out_dir / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0, mtime=0)
    windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)
    order = sequence_order(n_seq, split, seed)
    for sample in tqdm(range(n_samples), desc=f"write {split}", unit="sample", leave=False):
        first, last = sample * per_sample, min(n_seq, (sample + 1) * per_sample)
        rows = np.ascontiguousarray(windows[order[first:last] * seq_len])
        if sample % per_shard == 0:
            shards.append({"name": f"{split}-{len(shards):06d}.tar", "samples": 0, "sequences": 0, "tokens": 0})
        sink.write({"__key__": f"{split}-{sample:09d}", "tokens.npy": _npy_bytes(rows)})
        shards[-1]["samples"] += 1
        shards[-1]["sequences"] += len(rows)
        shards[-1]["tokens"] += len(rows) * seq_len
    sink.close()
    for shard in shards:
        path = out_dir / shard["name"]
        shard["bytes"] = path.stat().st_size
        shard["sha256"] = sha256_file(str(path))
    return {
        "shards": shards,
        "samples": n_samples,
        "sequences": n_seq,
        "tokens": n_seq * seq_len,
        "stream_tokens": int(len(stream)),
        "tail_tokens_left_out": int(len(stream) - (n_seq * seq_len + 1)) if n_seq else int(len(stream)),
    }
