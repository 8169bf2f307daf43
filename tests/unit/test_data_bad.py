"""Bad data stops the run with a message naming the shard/field and the fix, or, with
data.on_bad_shard=skip, is skipped, logged and counted; nothing is silently dropped or repeated."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_data_loader import EQUAL, SEQ_LEN, VOCAB, _rows, cfg, loader, make_dataset, row_ids, sha256, write_shard

from engram_train.data import DataError, build_val_loader, open_dataset


def _update_manifest(root: Path, shard: str) -> None:
    """Make the manifest agree with a rewritten shard, so only the shard's contents are wrong."""
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["name"] == shard:
            entry["sha256"] = sha256(root / shard)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _drain(ld, batches: int = 40) -> None:
    for _ in range(batches):
        next(ld)


@pytest.fixture
def root(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", EQUAL)


def test_sha256_mismatch_names_shard_and_fix(root):
    data = bytearray((root / "train-000003.tar").read_bytes())
    data[600] ^= 0xFF  # inside the first .npy payload: still a valid tar
    (root / "train-000003.tar").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000003.tar has a sha256 that disagrees with manifest.json.*--force.*on_bad_shard=skip"):
        loader(root)


def test_truncated_tar_names_shard(root):
    path = root / "train-000002.tar"
    path.write_bytes(path.read_bytes()[:2600])  # inside the third sample's data
    with pytest.raises(DataError, match=r"train-000002.tar: cannot be read as a tar file .*truncated or corrupt"):
        _drain(loader(root, verify_checksums=False))


def test_tar_cut_at_a_sample_boundary_is_caught_by_the_count(root):
    write_shard(root / "train-000005.tar", [_rows(1000, 4)])  # 1 of the 3 samples the manifest lists
    _update_manifest(root, "train-000005.tar")
    with pytest.raises(DataError, match=r"train-000005.tar: ended after 1 of the 3 samples manifest.json lists"):
        _drain(loader(root))


def test_corrupt_tar_names_shard(root):
    path = root / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[0:512] = b"\x17" * 512  # garbage where the first tar header should be
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000001.tar: cannot be read as a tar file"):
        _drain(loader(root, verify_checksums=False))


def test_tokens_outside_vocabulary_name_shard_sample_and_field(root):
    rows = _rows(2000, 4)
    rows[2, 5] = VOCAB + 3
    write_shard(root / "train-000004.tar", [_rows(3000, 4), rows, _rows(4000, 4)])
    _update_manifest(root, "train-000004.tar")
    with pytest.raises(DataError, match=r"train-000004.tar: sample 'train-000004-0001' field tokens.npy holds token ids in \[0, 5003\], outside the vocabulary \[0, 5000\)"):
        _drain(loader(root))


def test_wrong_row_shape_names_field(root):
    write_shard(root / "train-000000.tar", [np.zeros((4, SEQ_LEN + 3), np.uint16)] * 3)
    _update_manifest(root, "train-000000.tar")
    with pytest.raises(DataError, match=r"field tokens.npy has shape \(4, 11\).*expected integer \[n, 9\]"):
        _drain(loader(root))


def test_fewer_shards_than_ranks_times_workers(tmp_path):
    root = make_dataset(tmp_path / "ds", [[4]] * 3)
    with pytest.raises(DataError, match=r"data.shards: 3 shards cannot feed 4 row streams; write at least 4 shards .*--shards 4"):
        next(loader(root, world=2, num_workers=2))


def test_manifest_from_another_tokenizer(root):
    (root / "tokenizer.json").write_text('{"another": "tokenizer"}')
    with pytest.raises(DataError, match=r"tokenizer_sha256 .* another tokenizer.*--force"):
        open_dataset(cfg(root))


def _cut_and_flip(root: Path) -> None:
    path = root / "train-000006.tar"
    path.write_bytes(path.read_bytes()[:2600])  # inside its third sample
    data = bytearray((root / "train-000003.tar").read_bytes())
    data[600] ^= 0xFF
    (root / "train-000003.tar").write_bytes(bytes(data))


def test_skip_mode_logs_counts_and_delivers_every_good_row_once(root, caplog):
    _cut_and_flip(root)  # both fail the start-up checksum and are skipped whole
    with caplog.at_level(logging.WARNING):
        ld = loader(root, on_bad_shard="skip", batch=2)
        assert ld.stats()["data/bad_shards"] == 2, "known from the start-up checksums, before reading reaches them"
        assert ld.stats()["data/bad_shard_skips"] == 0
        seen = [i for _ in range(36) for i in row_ids(next(ld))]
    assert sorted(seen) == [i for i in range(1, 97) if not 37 <= i <= 48 and not 73 <= i <= 84], "good rows once, nothing else"
    assert ld.stats()["data/bad_shards"] == 2
    assert "train-000003.tar" in caplog.text and "train-000006.tar" in caplog.text and "on_bad_shard=skip" in caplog.text
    next(ld)
    assert ld.stats()["data/epoch"] == 1 and ld.stats()["data/bad_shard_skips"] == 4, "counted again in epoch 1"


def test_skip_mode_while_reading_keeps_what_was_read_before_the_error(root):
    path = root / "train-000006.tar"
    path.write_bytes(path.read_bytes()[:2600])
    ld = loader(root, on_bad_shard="skip", verify_checksums=False, batch=2)
    seen = [i for _ in range(44) for i in row_ids(next(ld))]
    # Sample 0 (ids 73..76) was read; sample 1 was still being grouped by wds when the tar broke.
    assert sorted(seen) == [i for i in range(1, 97) if not 77 <= i <= 84]
    assert ld.stats()["data/bad_shards"] == 1


def test_bad_val_shard_errors_and_skips(root):
    path = root / "val-000001.tar"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match="val-000001.tar"):
        build_val_loader(cfg(root), 2)
    val = build_val_loader(cfg(root, on_bad_shard="skip"), 2)
    assert len(val) == 4 and [len(row_ids(b)) for b in val] == [2] * 4  # shard 0 only: 8 rows
