"""Two real ranks (separate processes, gloo) x two loader workers each: one epoch covers every row once,
and a rank that stops, checkpoints and resumes delivers what an uninterrupted rank delivers."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import webdataset as wds

from engram_train.config import DataConfig
from engram_train.data import build_train_loader
from engram_train.data.manifest import MANIFEST_FORMAT
from tests.distributed.spawn import run_ranks

pytestmark = pytest.mark.slow

SEQ_LEN, SHARDS, SAMPLES, ROWS, BATCH = 8, 8, 3, 4, 4  # 96 rows; a rank's epoch is 12 batches of 4


def _write_dataset(root: Path) -> None:
    root.mkdir()
    (root / "tokenizer.json").write_text("{}")
    np.save(root / "compression.npy", np.arange(1000))
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    entries, next_id = [], 1
    for split, count in (("train", SHARDS), ("val", 1)):
        for s in range(count):
            name = f"{split}-{s:06d}.tar"
            with wds.TarWriter(str(root / name)) as sink:
                for k in range(SAMPLES):
                    rows = np.zeros((ROWS, SEQ_LEN + 1), np.uint16)
                    rows[:, 0] = np.arange(next_id, next_id + ROWS)
                    next_id += ROWS
                    buf = io.BytesIO()
                    np.save(buf, rows)
                    sink.write({"__key__": f"{name[:-4]}-{k}", "tokens.npy": buf.getvalue()})
            entries.append((split, {"name": name, "samples": SAMPLES, "sequences": SAMPLES * ROWS, "sha256": sha(root / name)}))
    manifest = {"format": MANIFEST_FORMAT, "seq_len": SEQ_LEN, "vocab_size": 1000, "eos_id": 0,
                "tokenizer_sha256": sha(root / "tokenizer.json"), "compression_sha256": sha(root / "compression.npy"),
                "splits": {split: {"shards": [e for sp, e in entries if sp == split]} for split in ("train", "val")}}
    (root / "manifest.json").write_text(json.dumps(manifest))


def _rank_reads(rank: int, world: int, root: str, stop_after: int) -> list[int]:
    dist.init_process_group("gloo")
    cfg = DataConfig(path=root, seq_len=SEQ_LEN, num_workers=2, shuffle_buffer=2)
    make = lambda: build_train_loader(cfg, micro_batch_size=BATCH, hasher=None, dp_rank=dist.get_rank(), dp_world=world, seed=7)  # noqa: E731
    loader = make()
    ids = [i for _ in range(stop_after) for i in next(loader)["tokens"][:, 0].tolist()]
    path = Path(root).parent / f"loader_rank{rank}.pt"
    torch.save(loader.global_state_dict(), path)  # collective: the merged global position
    loader.close()
    dist.barrier()  # both ranks stopped, as at a checkpoint
    resumed = make()
    resumed.load_state_dict(torch.load(path, weights_only=True))
    ids += [i for _ in range(24 - stop_after) for i in next(resumed)["tokens"][:, 0].tolist()]
    dist.destroy_process_group()
    return ids


def test_two_ranks_two_workers_epoch_coverage_and_resume(tmp_path):
    _write_dataset(tmp_path / "ds")
    per_rank = run_ranks(2, _rank_reads, str(tmp_path / "ds"), 5)
    everything = list(range(1, SHARDS * SAMPLES * ROWS + 1))
    for epoch in range(2):
        seen = [i for ids in per_rank for i in ids[epoch * 48 : (epoch + 1) * 48]]
        assert sorted(seen) == everything, f"epoch {epoch}: every row exactly once over 2 ranks x 2 workers"
    cfg = DataConfig(path=str(tmp_path / "ds"), seq_len=SEQ_LEN, num_workers=2, shuffle_buffer=2)
    for rank, ids in enumerate(per_rank):
        reference = build_train_loader(cfg, micro_batch_size=BATCH, hasher=None, dp_rank=rank, dp_world=2, seed=7)
        expected = [i for _ in range(24) for i in next(reference)["tokens"][:, 0].tolist()]
        assert ids == expected, f"rank {rank}: resumed stream differs from the uninterrupted one"
        assert len(ids) == 96
