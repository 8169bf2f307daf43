"""A prepared dataset folder: its manifest, tokenizer and compression table, checked before any training.

Every check here runs once at start-up, in the main process, so a wrong folder, a manifest from
another tokenizer or a corrupted shard stops the run before the first step with a message that
names the file or field and the command that fixes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

log = logging.getLogger(__name__)

#: Written by ``data_pipelines.prepare``; bump when the shard layout changes incompatibly.
MANIFEST_FORMAT = "engram-packed-v1"
PREPARE_HINT = "make data  (or: python -m data_pipelines.prepare --out {path})"


class DataError(RuntimeError):
    """The prepared data cannot be used as is; the message names the shard or field and the fix."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard as the manifest describes it, plus where to read it from."""

    name: str
    url: str
    samples: int
    sequences: int
    sha256: str

    @property
    def is_local(self) -> bool:
        return "://" not in self.url and not self.url.startswith("pipe:")


@dataclass
class Dataset:
    """An opened, validated dataset folder (``data.path``)."""

    path: Path
    manifest: dict[str, Any]
    train: list[ShardInfo]
    val: list[ShardInfo]
    #: Shards failing the sha256 check that data.on_bad_shard=skip lets through; streams skip them.
    bad: dict[str, str] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @cached_property
    def compression(self) -> np.ndarray:
        """int64 raw id -> canonical id table the Engram hasher needs."""
        return np.load(self.path / "compression.npy", allow_pickle=False)


def _require(manifest: dict, key: str, where: Path) -> Any:
    if key not in manifest:
        raise DataError(f"{where}: field {key!r} is missing; the folder was not written by this prepare. "
                        f"Rebuild it: {PREPARE_HINT.format(path=where.parent)} --force")
    return manifest[key]


def _shard_urls(override: str, names: list[str], split: str) -> list[str] | None:
    """Expand ``data.{split}_urls`` (brace notation, pipe:) and match it to the manifest's shard names."""
    if not override:
        return None
    urls = wds.shardlists.expand_urls(override)
    if len(urls) != len(names):
        raise DataError(f"data.{split}_urls expands to {len(urls)} urls but manifest.json lists {len(names)} "
                        f"{split} shards; list every shard, in manifest order")
    for url, name in zip(urls, names):
        if not re.search(re.escape(name) + r"(\b|$)", url):
            raise DataError(f"data.{split}_urls: {url!r} does not name shard {name!r} (urls must follow manifest order)")
    return urls


def open_dataset(data_cfg: Any, *, check_shards: bool = True) -> Dataset:
    """Read and check ``data_cfg.path``; verifies shard sha256s when ``data.verify_checksums`` is on."""
    path = Path(data_cfg.path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"data.path={str(path)!r}: no prepared dataset there (manifest.json is missing). "
                        f"Prepare it first: {PREPARE_HINT.format(path=path)}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{manifest_path}: not valid JSON ({exc}); rebuild with {PREPARE_HINT.format(path=path)} --force") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{manifest_path}: format {manifest.get('format')!r}, this trainer reads {MANIFEST_FORMAT!r}; "
                        f"rebuild with {PREPARE_HINT.format(path=path)} --force")
    seq_len = int(_require(manifest, "seq_len", manifest_path))
    if seq_len != data_cfg.seq_len:
        raise DataError(f"data.seq_len={data_cfg.seq_len} but {manifest_path} was packed with seq_len={seq_len}; "
                        f"set data.seq_len={seq_len} or re-run prepare with --seq-len {data_cfg.seq_len} --out {path}")
    for name, key in (("tokenizer.json", "tokenizer_sha256"), ("compression.npy", "compression_sha256")):
        expected = _require(manifest, key, manifest_path)
        file = path / name
        if not file.is_file():
            raise DataError(f"{file} is missing; rebuild with {PREPARE_HINT.format(path=path)} --force")
        actual = sha256_file(file)
        if actual != expected:
            raise DataError(f"{manifest_path}: field {key} is {expected[:12]}... but {name} hashes to {actual[:12]}...: "
                            f"the shards were tokenized with another tokenizer. Rebuild them: "
                            f"{PREPARE_HINT.format(path=path)} --force")
    splits = _require(manifest, "splits", manifest_path)
    shards = {}
    for split in ("train", "val"):
        entries = splits.get(split, {}).get("shards", [])
        names = [e["name"] for e in entries]
        urls = _shard_urls(getattr(data_cfg, f"{split}_urls", ""), names, split) or [str(path / n) for n in names]
        shards[split] = [ShardInfo(e["name"], u, int(e["samples"]), int(e["sequences"]), e["sha256"]) for e, u in zip(entries, urls)]
    if not shards["train"]:
        raise DataError(f"{manifest_path}: no train shards listed; rebuild with {PREPARE_HINT.format(path=path)} --force")
    dataset = Dataset(path, manifest, shards["train"], shards["val"])
    if check_shards:
        _check_shards(dataset, data_cfg)
    return dataset


#: (path, size, mtime_ns, sha256) of shards already verified in this process: the trainer opens the
#: dataset for every evaluation, and hashing gigabytes each time would stall it.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _checksum_ok(shard: ShardInfo) -> bool:
    st = os.stat(shard.url)
    key = (os.path.abspath(shard.url), st.st_size, st.st_mtime_ns, shard.sha256)
    if key not in _VERIFIED:
        if sha256_file(shard.url) != shard.sha256:
            return False
        _VERIFIED.add(key)
    return True


def _check_shards(dataset: Dataset, data_cfg: Any) -> None:
    remote = 0
    for shard in dataset.train + dataset.val:
        if not shard.is_local:
            remote += 1
            continue
        if not os.path.isfile(shard.url):
            problem = "is missing"
        elif data_cfg.verify_checksums and not _checksum_ok(shard):
            problem = f"has a sha256 that disagrees with manifest.json ({shard.sha256[:12]}...): truncated or overwritten"
        else:
            continue
        message = (f"shard {shard.url} {problem}. Re-run {PREPARE_HINT.format(path=dataset.path)} --force, "
                   f"or set data.on_bad_shard=skip to train without it")
        if data_cfg.on_bad_shard != "skip":
            raise DataError(message)
        dataset.bad[shard.name] = problem
        log.warning("%s (skipping it: data.on_bad_shard=skip)", message)
    if remote and data_cfg.verify_checksums:
        log.info("%d remote shards: sha256 not verified up front; sample counts and token ranges are still checked", remote)
