"""Training/validation loader properties on small real tar shards: exact coverage, exact resume, refusals.

Every row written by ``make_dataset`` starts with its own id, so a test can tell exactly which rows
a loader delivered, how often, and in which order.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from engram_train.config import DataConfig
from engram_train.data import DataError, LoaderState, build_train_loader, build_val_loader, open_dataset
from engram_train.data.loader import merge_states
from engram_train.data.manifest import MANIFEST_FORMAT
from engram_train.data.stream import RowStream, StreamSpec

SEQ_LEN = 8
VOCAB = 5000
EOS = 0


class FakeHasher:
    """Stands in for the Engram hasher: [B, T] -> [B, T, L=2, H=3], and shows which EOS it was given."""

    def hash_numpy(self, tokens: np.ndarray, doc_boundary_token: int | None = None) -> np.ndarray:
        base = tokens.astype(np.int64)[..., None, None] * 10 + np.arange(2)[:, None] * 3 + np.arange(3)
        return base + (0 if doc_boundary_token is None else 1_000_000 * (doc_boundary_token + 1))


def _rows(first_id: int, n: int) -> np.ndarray:
    rows = np.full((n, SEQ_LEN + 1), 7, dtype=np.uint16)
    rows[:, 0] = np.arange(first_id, first_id + n)  # row id, unique over the dataset
    rows[:, 1] = EOS
    return rows


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_shard(path: Path, samples: list[np.ndarray]) -> None:
    with wds.TarWriter(str(path), mtime=0) as sink:
        for i, rows in enumerate(samples):
            sink.write({"__key__": f"{path.stem}-{i:04d}", "tokens.npy": _npy(rows)})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_dataset(root: Path, train: list[list[int]], val: list[list[int]] | None = None) -> Path:
    """A dataset folder; ``train[s][k]`` is the number of rows in sample k of train shard s."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    np.save(root / "compression.npy", np.arange(VOCAB, dtype=np.int64))
    next_id = 1
    splits = {}
    for split, layout in (("train", train), ("val", val or [[4, 4], [4, 3]])):
        entries = []
        for s, sample_sizes in enumerate(layout):
            samples = []
            for n in sample_sizes:
                samples.append(_rows(next_id, n))
                next_id += n
            name = f"{split}-{s:06d}.tar"
            write_shard(root / name, samples)
            entries.append({"name": name, "samples": len(samples), "sequences": sum(sample_sizes),
                            "tokens": sum(sample_sizes) * SEQ_LEN, "bytes": (root / name).stat().st_size, "sha256": sha256(root / name)})
        splits[split] = {"shards": entries}
    manifest = {
        "format": MANIFEST_FORMAT, "seq_len": SEQ_LEN, "vocab_size": VOCAB, "eos_id": EOS, "dtype": "uint16",
        "tokenizer_sha256": sha256(root / "tokenizer.json"), "compression_sha256": sha256(root / "compression.npy"),
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def row_ids(batch: dict) -> list[int]:
    return batch["tokens"][:, 0].tolist()


def all_train_ids(root: Path) -> list[int]:
    ids = []
    for shard in json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"]:
        for sample in wds.WebDataset(str(root / shard["name"]), shardshuffle=False, empty_check=False):
            ids += np.load(io.BytesIO(sample["tokens.npy"]))[:, 0].tolist()
    return ids


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(path=str(root), seq_len=SEQ_LEN, **kw)


def loader(root: Path, *, rank=0, world=1, batch=4, hasher=None, seed=5, eos_reset=False, **kw):
    kw.setdefault("num_workers", 0)  # worker processes only where a test is about them: they cost ~0.5 s each
    return build_train_loader(cfg(root, **kw), micro_batch_size=batch, hasher=hasher, dp_rank=rank, dp_world=world,
                              seed=seed, eos_reset=eos_reset)


EQUAL = [[4, 4, 4]] * 8  # 8 shards x 12 rows: 2 ranks x 2 workers get 24 rows = 6 batches of 4 each


@pytest.mark.timeout(60)
def test_two_ranks_two_workers_read_every_row_once_per_epoch(tmp_path):
    root = make_dataset(tmp_path / "ds", EQUAL)
    everything = sorted(all_train_ids(root))
    loaders = [loader(root, rank=r, world=2, num_workers=2, shuffle_buffer=2) for r in range(2)]
    epochs = []
    for _ in range(2):
        seen = [i for ld in loaders for _ in range(12) for i in row_ids(next(ld))]
        assert sorted(seen) == everything, "an epoch must deliver every row exactly once over ranks x workers"
        epochs.append(seen)
    assert epochs[0] != epochs[1], "epochs are reshuffled by (seed, epoch)"
    assert all(ld.stats()["data/epoch"] == 1 for ld in loaders)


def test_uneven_shards_each_stream_epoch_is_a_partition(tmp_path):
    """With unequal shards the streams' epochs end at different batches; rows tagged by epoch still partition."""
    root = make_dataset(tmp_path / "ds", [[5, 2], [3], [4, 4, 1], [2, 2], [6], [1, 1, 1]])
    dataset = open_dataset(cfg(root))
    for epoch in range(3):
        seen = []
        for rank in range(2):
            for worker in range(2):
                spec = StreamSpec(dataset.train, SEQ_LEN, VOCAB, seed=3, rank=rank, world=2, workers=2, shuffle_buffer=2, on_bad_shard="error")
                for row, cursor in RowStream(spec, worker, (epoch, 0, 0), []):
                    if cursor[0] != epoch:
                        break
                    seen.append(int(row[0]))
        assert Counter(seen) == Counter(all_train_ids(root))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers,stop_after", [(0, 5), (2, 1), (2, 8)])
def test_resume_continues_exactly(tmp_path, num_workers, stop_after):
    # Batches of 3 rows do not divide a stream's epoch, so batches straddle epoch and shard boundaries.
    root = make_dataset(tmp_path / "ds", [[4, 3], [5], [2, 2, 2], [3, 4], [6], [1, 5]])
    kw = dict(num_workers=num_workers, shuffle_buffer=2, batch=3, hasher=FakeHasher())
    reference = loader(root, **kw)
    expected = [next(reference) for _ in range(25)]

    first = loader(root, **kw)
    got = [next(first) for _ in range(stop_after)]
    torch.save({"loader": first.state_dict()}, tmp_path / "ckpt.pt")
    first.close()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    second = loader(root, **kw)
    second.load_state_dict(saved)
    got += [next(second) for _ in range(25 - stop_after)]

    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["hash_ids"], b["hash_ids"])
    assert second.stats()["data/batches"] == 25


def test_batch_format_and_hash_ids(tmp_path):
    root = make_dataset(tmp_path / "ds", EQUAL)
    batch = next(loader(root, hasher=FakeHasher(), batch=4))
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (4, SEQ_LEN + 1)
    assert batch["hash_ids"].dtype == torch.int64 and batch["hash_ids"].shape == (4, SEQ_LEN, 2, 3)
    expected = FakeHasher().hash_numpy(batch["tokens"][:, :-1].numpy())
    assert np.array_equal(batch["hash_ids"].numpy(), expected), "hash ids are of tokens[:, :-1], without EOS reset"
    # The table lookup's dedup, done in the worker: sorted distinct ids and each id's index among them.
    unique, inverse = torch.unique(batch["hash_ids"].flatten(), return_inverse=True)
    assert torch.equal(batch["hash_unique"].unique, unique) and torch.equal(batch["hash_unique"].inverse, inverse)
    reset = next(loader(root, hasher=FakeHasher(), batch=4, eos_reset=True))
    assert np.array_equal(reset["hash_ids"].numpy(), FakeHasher().hash_numpy(reset["tokens"][:, :-1].numpy(), doc_boundary_token=EOS))
    unhashed = next(loader(root, hasher=None))
    assert unhashed["hash_ids"] is None and unhashed["hash_unique"] is None


def _global_order(loaders: list, rounds: int) -> list[list[int]]:
    """Row ids of global micro-batches ``g``: data-parallel rank ``g % D`` consumes them in order, round by round."""
    return [row_ids(next(ld)) for _ in range(rounds) for ld in loaders]


@pytest.mark.timeout(120)
def test_a_checkpoint_resumes_the_same_global_order_at_any_data_parallel_size_and_worker_count(tmp_path):
    """2 ranks x 2 workers (4 streams) stop after 6 rounds; the merged position resumes at 1, 3 and 4 ranks, with
    and without worker processes, as does the older per-rank form of the same position."""
    # Batches of 3 rows do not divide a stream's epoch, so batches straddle epoch and shard boundaries.
    root = make_dataset(tmp_path / "ds", [[4, 3], [5], [2, 2, 2], [3, 4], [6], [1, 5]])
    kw = dict(shuffle_buffer=2, batch=3)
    uninterrupted = [loader(root, rank=r, world=2, num_workers=2, **kw) for r in range(2)]
    expected = _global_order(uninterrupted, 30)
    for ld in uninterrupted:
        ld.close()
    first = [loader(root, rank=r, world=2, num_workers=2, **kw) for r in range(2)]
    got = _global_order(first, 6)
    views = [ld.state_dict() for ld in first]
    for ld in first:
        ld.close()
    position = merge_states(views)
    assert position["batches"] == 12 and position["ranks"] == 2 and position["workers"] == 2
    legacy = [{"dp_world": 2, "dp_rank": r, "workers": 2, "seed": 5, "batches": 6, "data_id": position["data_id"],
               "cursors": [position["cursors"][w * 2 + r] for w in range(2)],
               "skipped": [position["skipped"][w * 2 + r] for w in range(2)]} for r in range(2)]
    for world, num_workers, saved in ((1, 2, position), (3, 0, position), (4, 0, position), (4, 0, legacy)):
        resumed = [loader(root, rank=r, world=world, num_workers=num_workers, **kw) for r in range(world)]
        for ld in resumed:
            ld.load_state_dict(saved)
        rest = _global_order(resumed, (60 - 12) // world)
        assert got + rest == expected, f"resumed at {world} ranks x {num_workers} workers"
        assert all(ld.stats()["data/batches"] == 60 for ld in resumed)
        for ld in resumed:
            ld.close()


@pytest.mark.timeout(120)
def test_fixed_streams_give_every_data_parallel_size_the_same_order_from_the_start(tmp_path):
    """data.streams=4: fresh runs at 1 rank (2 worker processes), 2, 3 and 8 ranks read the global order that a
    4-rank launch reads by default (4 ranks x 1 worker are the same 4 streams)."""
    root = make_dataset(tmp_path / "ds", [[4, 3], [5], [2, 2, 2], [3, 4], [6], [1, 5]])
    kw = dict(shuffle_buffer=2, batch=3)
    four = [loader(root, rank=r, world=4, **kw) for r in range(4)]
    expected = _global_order(four, 6)
    for world, num_workers in ((1, 2), (2, 0), (3, 0), (8, 0)):
        launch = [loader(root, rank=r, world=world, num_workers=num_workers, streams=4, **kw) for r in range(world)]
        assert _global_order(launch, 24 // world) == expected, f"{world} ranks x {num_workers} workers"
        assert {(ld.state.ranks, ld.state.workers) for ld in launch} == {(4, 1)}
        for ld in launch:
            ld.close()
    # Without data.streams the layout is the launch's own, so one rank reads another order.
    assert _global_order([loader(root, **kw)], 24) != expected


def test_resume_on_other_data_or_seed_or_too_few_shards_is_refused(tmp_path):
    root = make_dataset(tmp_path / "ds", EQUAL)
    two = loader(root, rank=0, world=2, num_workers=2)
    next(two)
    with pytest.raises(DataError, match=r"shuffled with seed 5, this run uses 6; keep experiment.seed"):
        loader(root, seed=6).load_state_dict(two.state_dict())
    other = make_dataset(tmp_path / "other", [[4, 4, 4]] * 3)
    with pytest.raises(DataError, match=r"data.shards: 3 shards cannot feed 4 row streams; write at least 4"):
        loader(other).load_state_dict({**two.state_dict(), "data_id": loader(other).state.data_id})
    with pytest.raises(DataError, match=r"trained on other shards"):
        loader(other).load_state_dict(two.state_dict())


def test_state_is_plain_and_roundtrips(tmp_path):
    root = make_dataset(tmp_path / "ds", EQUAL)
    ld = loader(root)
    next(ld)
    state = ld.state_dict()
    assert LoaderState(**state).batches == 1
    torch.save(state, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == state


def test_val_loader_is_deterministic_finite_and_split_over_ranks(tmp_path):
    root = make_dataset(tmp_path / "ds", EQUAL, val=[[4, 4, 4], [4, 3]])  # 19 rows
    one = [row_ids(b) for b in build_val_loader(cfg(root), 2)]
    assert one == [row_ids(b) for b in build_val_loader(cfg(root), 2)]
    assert len(one) == 9 and build_val_loader(cfg(root), 2).rows_left_out == 1
    ranks = [build_val_loader(cfg(root), 2, dp_rank=r, dp_world=2) for r in range(2)]
    batches = [[row_ids(b) for b in v] for v in ranks]
    assert len(batches[0]) == len(batches[1]) == 4, "every rank gets the same number of batches"
    assert not set(sum(batches[0], [])) & set(sum(batches[1], []))
    hashed = next(iter(build_val_loader(cfg(root), 2, FakeHasher())))
    assert hashed["hash_ids"].shape == (2, SEQ_LEN, 2, 3)


def test_missing_folder_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match=r"make data .*python -m data_pipelines.prepare --out"):
        loader(tmp_path / "nowhere")


def test_seq_len_mismatch_names_both_values(tmp_path):
    root = make_dataset(tmp_path / "ds", EQUAL)
    with pytest.raises(DataError, match=r"data.seq_len=16 .* seq_len=8"):
        open_dataset(DataConfig(path=str(root), seq_len=16))


def test_shards_from_urls_with_braces_and_pipe(tmp_path):
    root = make_dataset(tmp_path / "ds", EQUAL)
    urls = f"pipe:cat {root}/train-{{000000..000007}}.tar"
    via_pipe = loader(root, train_urls=urls)
    local = loader(root)
    for _ in range(30):
        assert torch.equal(next(via_pipe)["tokens"], next(local)["tokens"])
    with pytest.raises(DataError, match="expands to 2 urls"):
        loader(root, train_urls=f"{root}/train-{{000000..000001}}.tar")



def test_workers_survive_the_parents_garbage_and_never_hold_the_exit(tmp_path):
    """Two ways the worker processes broke the suite (CI: a worker SIGSEGV, then pytest hung after its summary until
    the job's time ran out), each in a fresh process, with the shipped num_workers=2:

    1. The workers are forked from a process that holds garbage with threads behind it (here a dropped gloo group
       in a reference cycle; in the suite one left by an earlier in-process run). A garbage collection in a worker
       (forced here by the hasher, which runs there) must not run its destructor, which joins threads that do not
       exist in the child: without ``gc.freeze`` around the fork the worker crashes or hangs.
    2. A worker torch's own shutdown cannot stop (SIGSTOPped: stuck on I/O, or beside a crashed sibling) of a loader
       dropped without ``close()``: multiprocessing's exit hook SIGTERMs it (our workers ignore SIGTERM) and joins
       it without a timeout, so the process must have killed it itself to exit.
    """
    import subprocess
    import sys

    root = make_dataset(tmp_path / "ds", [[4, 3], [5], [2, 2, 2], [3, 4]])
    script = f"""
import gc, os, signal
import numpy as np
import torch.distributed as dist
from engram_train.config import DataConfig
from engram_train.data import build_train_loader

class CollectingHasher:
    def hash_numpy(self, tokens, doc_boundary_token=None):
        gc.collect()
        return np.zeros(tokens.shape + (1, 1), dtype=np.int64)

class Holder:
    pass

gc.disable()  # the garbage stays uncollected here until the workers are forked
garbage = Holder()
garbage.cycle, garbage.group = garbage, dist.ProcessGroupGloo(dist.FileStore({str(tmp_path / "store")!r}, 1), 0, 1)
del garbage
loader = build_train_loader(DataConfig(path={str(root)!r}, seq_len={SEQ_LEN}, num_workers=2, shuffle_buffer=2),
                            micro_batch_size=3, hasher=CollectingHasher(), dp_rank=0, dp_world=1, seed=0)
for _ in range(4):
    next(loader)
print("read past the workers' garbage collections", flush=True)
for pid in loader.worker_pids():
    os.kill(pid, signal.SIGSTOP)
del loader
gc.enable()
gc.collect()
print("dropped the loader", flush=True)
"""
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90,
                              cwd=Path(__file__).parents[2])
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the process hung; it printed: {hung.stdout!r}")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.splitlines() == ["read past the workers' garbage collections", "dropped the loader"]
