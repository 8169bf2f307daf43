"""The prepare CLI end to end on a tiny corpus: shards decode back to the deduplicated documents,
the manifest is complete, a re-run is a no-op, a changed input rebuilds, and the loader reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from tokenizers import Tokenizer

from data_pipelines import prepare
from data_pipelines.pack import sequence_order
from engram_train.config import DataConfig
from engram_train.data import build_train_loader, build_val_loader, open_dataset

SEQ_LEN = 16


def _corpus(root: Path) -> tuple[Path, Path, list[str]]:
    train, val = root / "train", root / "val"
    (train / "sub").mkdir(parents=True)
    val.mkdir()
    docs = [f"Document {i}: the quick brown fox {i * 7} jumps over the lazy dog. " * (1 + i % 5) for i in range(60)]
    for i, doc in enumerate(docs[:40]):
        (train / f"{i}.txt").write_text(doc)
    (train / "sub" / "more.md").write_text(docs[40])
    (train / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[41:50]))
    (train / "copy.txt").write_text("  " + docs[3].replace(" ", "\n") + "\n")  # same words, other whitespace
    for i, doc in enumerate(docs[50:]):
        (val / f"v{i}.txt").write_text(doc)
    return train, val, docs


def _argv(out: Path, train: Path, val: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--source", str(train), "--val-source", str(val), "--vocab-size", "300",
            "--seq-len", str(SEQ_LEN), "--seqs-per-sample", "4", "--shards", "4", "--val-shards", "1", "--workers", "2", *extra]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    train, val, docs = _corpus(root)
    out = root / "out"
    assert prepare.main(_argv(out, train, val)) == 0
    return out, train, val, docs


def _stream(out: Path, split: str) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        for sample in wds.WebDataset(str(out / shard["name"]), shardshuffle=False, empty_check=False).decode():
            rows.append(sample["tokens.npy"])
    rows = np.concatenate(rows)
    # Shards hold the sequences in a seeded random order; put them back in stream order.
    restored = np.empty_like(rows)
    restored[sequence_order(len(rows), split, manifest["options"]["seed"])] = rows
    rows = restored
    assert np.array_equal(rows[1:, 0], rows[:-1, -1]), "rows overlap by one token"
    return np.concatenate([rows[0], *[r[1:] for r in rows[1:]]])


def test_shards_decode_to_the_deduplicated_documents(prepared):
    out, _, _, docs = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    stream = _stream(out, "train")
    pieces = np.split(stream, np.flatnonzero(stream == manifest["eos_id"]) + 1)
    decoded = [tok.decode(p[:-1].tolist()) for p in pieces if len(p) and p[-1] == manifest["eos_id"]]
    assert len(decoded) == len(set(decoded)), "no document twice"
    # copy.txt is docs[3] re-wrapped: whichever of the two is read first is kept, byte for byte.
    originals = set(docs[:50]) | {(out.parent / "train" / "copy.txt").read_text()}
    assert set(decoded) <= originals and len(decoded) >= 45, "documents come back exactly (all but the cut tail)"
    assert len({" ".join(d.split()) for d in decoded}) == len(decoded), "re-wrapped duplicates were dropped"
    train = manifest["splits"]["train"]
    assert train["documents"] == 50 and train["duplicates"] == 1
    assert train["stream_tokens"] == train["sequences"] * SEQ_LEN + 1 + train["tail_tokens_left_out"]


def test_manifest_records_what_the_trainer_and_checks_need(prepared):
    out, *_ = prepared
    m = json.loads((out / "manifest.json").read_text())
    assert m["seq_len"] == SEQ_LEN and m["eos_id"] == 0 and m["vocab_size"] == 300 and m["dtype"] == "uint16"
    assert len(m["splits"]["train"]["shards"]) >= 4 and m["splits"]["val"]["shards"]
    for shard in m["splits"]["train"]["shards"]:
        assert {"name", "sha256", "bytes", "samples", "sequences", "tokens"} <= set(shard)
    assert m["sources"]["train"] and m["sources"]["val"] and m["tokenizer_sha256"] and m["compression_sha256"]
    assert np.load(out / "compression.npy").shape == (300,)


def test_rerun_is_a_noop_and_changed_input_rebuilds(prepared, capsys):
    out, train, val, _ = prepared
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare.main(_argv(out, train, val))
    assert "up to date" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    fingerprint = json.loads((out / "manifest.json").read_text())["fingerprint"]
    (train / "new.txt").write_text("A brand new document about foxes. " * 10)
    prepare.main(_argv(out, train, val))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] != fingerprint and manifest["splits"]["train"]["documents"] == 51
    assert not (out.parent / "out.partial").exists() and not (out.parent / "out.old").exists()


def test_other_compression_rules_rebuild_the_dataset(prepared, capsys, monkeypatch):
    """compression.npy is part of the output: a dataset built under older rules must not be reused."""
    from engram_train.engram import tokenizer_compression

    out, train, val, _ = prepared
    prepare.main(_argv(out, train, val))
    assert "up to date" in capsys.readouterr().out
    monkeypatch.setattr(tokenizer_compression, "COMPRESSION_SCHEME", "older-rules")
    prepare.main(_argv(out, train, val))
    assert "up to date" not in capsys.readouterr().out


def test_loader_reads_the_prepared_folder(prepared):
    out, *_ = prepared
    cfg = DataConfig(path=str(out), seq_len=SEQ_LEN, num_workers=2)
    assert open_dataset(cfg).vocab_size == 300
    loader = build_train_loader(cfg, micro_batch_size=4, hasher=None, dp_rank=0, dp_world=1, seed=0)
    batch = next(loader)
    assert batch["tokens"].shape == (4, SEQ_LEN + 1) and int(batch["tokens"].max()) < 300
    assert len(list(build_val_loader(cfg, 2))) >= 1


def test_real_hasher_in_loader_workers(prepared):
    from engram_train.config import EngramConfig
    from engram_train.engram import NgramHasher

    out, *_ = prepared
    cfg = DataConfig(path=str(out), seq_len=SEQ_LEN, num_workers=2)
    dataset = open_dataset(cfg)
    hasher = NgramHasher.from_config(EngramConfig(), dataset.compression, pad_token_id=dataset.eos_id)
    loader = build_train_loader(cfg, micro_batch_size=4, hasher=hasher, dp_rank=0, dp_world=1, seed=0, eos_reset=True, dataset=dataset)
    for _ in range(3):
        batch = next(loader)
        expected = hasher.hash_numpy(batch["tokens"][:, :-1].numpy(), doc_boundary_token=dataset.eos_id)
        assert batch["hash_ids"].shape == (4, SEQ_LEN, 1, 16) and np.array_equal(batch["hash_ids"].numpy(), expected)


def test_help_is_clear():
    result = subprocess.run([sys.executable, "-m", "data_pipelines.prepare", "--help"], capture_output=True, text=True,
                            cwd=Path(__file__).parents[2], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert result.returncode == 0
    for flag in ("--out", "--source", "--max-mb", "--tokenizer", "--shards", "--seq-len", "--force"):
        assert flag in result.stdout


def test_a_tokenizer_worker_that_dies_stops_the_run_with_its_reason(tmp_path):
    """A worker process that dies (here its tokenizer fails to load in the initializer, as a crash would end it)
    must stop tokenization with a one-line reason and the fix; a multiprocessing.Pool respawns such workers and
    waits forever."""
    from data_pipelines import pack

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(8)))
    with pytest.raises(RuntimeError, match=r"^tokenize train: a tokenizer worker process died \(.*\); rerun with "
                                           r"--workers 1 to see its error in this process$"):
        pack.tokenize_spool(docs, tmp_path / "tokens.bin", "not a tokenizer", 0, np.dtype(np.uint16), 2, 100,
                            "tokenize train")
