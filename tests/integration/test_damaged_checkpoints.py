"""Damaged and hostile checkpoints, and a full disk: a truncated or altered file in the newest checkpoint is named,
the folder set aside (not deleted) and the run resumes from the previous one on the same curve; a pickle payload
planted in any checkpoint file never runs, even where meta.json's checksum was forged to match; a save that fills
the disk says "No space left on device" and the next launch on a freed disk resumes on the same curve."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engram_train.checkpoint import SET_ASIDE, Checkpointer, file_sha256
from engram_train.train import train

from .conftest import REPO, TINY_OVERRIDES, compose_config

pytestmark = pytest.mark.slow

NEWEST, PREVIOUS = "step_00000004", "step_00000002"


def _config(dataset: Path, run_dir: Path):
    return compose_config(*TINY_OVERRIDES, f"data.path={dataset}", f"experiment.run_dir={run_dir}",
                          f"experiment.total_tokens={4 * 1024}", "experiment.checkpoint_every=2", "experiment.log_every=1",
                          "experiment.wandb.mode=disabled")


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in records}) == len(records), "each step once"
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def original(tiny_dataset, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("original") / "run"
    train(_config(tiny_dataset, run_dir))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [PREVIOUS, NEWEST]
    return run_dir


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


class _Payload:
    """Unpickling it creates a folder: evidence that loading ran code."""

    def __init__(self, evidence: Path):
        self.evidence = str(evidence)

    def __reduce__(self):
        return os.mkdir, (self.evidence,)


def _relaunch(original: Path, tiny_dataset, tmp_path, damage) -> tuple[Path, dict]:
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    damage(run_dir / "checkpoints" / NEWEST)
    return run_dir, train(_config(tiny_dataset, run_dir))


def _assert_set_aside_and_resumed(original: Path, run_dir: Path, summary: dict, log: str, file: str, reason: str) -> None:
    checkpoints = run_dir / "checkpoints"
    aside = checkpoints / (NEWEST + SET_ASIDE)
    assert f"checkpoint {checkpoints / NEWEST} is damaged ({file}: " in log and reason in log, log
    assert f"set aside as {aside.name}" in log
    assert aside.is_dir() and (aside / file).exists(), "set aside, never deleted"
    assert summary["steps"] == 4 and (checkpoints / NEWEST).is_dir()
    assert _losses(run_dir) == _losses(original), "resumed from the previous checkpoint on the same curve"


@pytest.mark.parametrize("file, damage, reason", [
    ("rank_0.pt", _truncate, "truncated or altered"),
    ("table-shard-00000-of-00001.pt", _flip, "truncated or altered"),
    ("backbone/__0_0.distcp", _flip, "truncated or altered"),
    ("backbone/.metadata", _truncate, "truncated or altered"),
    ("meta.json", _truncate, "unreadable"),
])
def test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_previous_one_resumes(original, tiny_dataset, tmp_path,
                                                                                    caplog, file, damage, reason):
    def damage_and_leave_a_partial(folder: Path) -> None:
        damage(folder / file)
        shutil.copytree(folder, folder.with_name("step_00000006.partial"))

    with caplog.at_level(logging.WARNING):
        run_dir, summary = _relaunch(original, tiny_dataset, tmp_path, damage_and_leave_a_partial)
    _assert_set_aside_and_resumed(original, run_dir, summary, caplog.text, file, reason)
    assert not (run_dir / "checkpoints" / "step_00000006.partial").exists(), "stale partial removed at start-up"


@pytest.mark.parametrize("file", ["backbone/.metadata", "backbone/common.pt", "rank_0.pt", "table-shard-00000-of-00001.pt"])
def test_a_planted_payload_never_runs_even_with_a_forged_checksum(original, tiny_dataset, tmp_path, caplog, file):
    evidence = tmp_path / "payload-ran"

    def plant(folder: Path) -> None:
        target = folder / file
        if target.name == ".metadata":  # DCP pickles this file itself
            target.write_bytes(pickle.dumps(_Payload(evidence)))
        else:
            torch.save({"rows": _Payload(evidence)}, target)
        meta = json.loads((folder / "meta.json").read_text())
        meta["sha256"][file] = file_sha256(target)
        (folder / "meta.json").write_text(json.dumps(meta))

    with caplog.at_level(logging.WARNING):
        run_dir, summary = _relaunch(original, tiny_dataset, tmp_path, plant)
    assert not evidence.exists(), f"loading {file} ran the planted code"
    _assert_set_aside_and_resumed(original, run_dir, summary, caplog.text, file, "")


def test_load_verifies_and_names_the_file(original, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(original, copy)
    _flip(copy / "checkpoints" / NEWEST / "rank_0.pt")
    checkpointer = Checkpointer(copy, rank=0, world=1, keep=2)
    assert checkpointer.verify(copy / "checkpoints" / PREVIOUS) is None
    problem = checkpointer.verify(copy / "checkpoints" / NEWEST)
    assert problem.startswith("rank_0.pt: sha256 ") and "truncated or altered" in problem



def test_the_backbone_loader_refuses_payloads_even_unverified(original, tmp_path):
    """Second line of defence: inside ``loading_without_code`` (where ``load_backbone`` runs Megatron and DCP), the
    reads DCP and Megatron do themselves refuse a payload instead of running it, whatever verification missed."""
    from torch.distributed.checkpoint import FileSystemReader

    from engram_train.backbone.dcp_files import UnsafeCheckpointError, loading_without_code

    evidence = tmp_path / "payload-ran"
    folder = tmp_path / "backbone"
    shutil.copytree(original / "checkpoints" / NEWEST / "backbone", folder)
    with loading_without_code():
        assert FileSystemReader(str(folder)).read_metadata().state_dict_metadata  # the real metadata still reads
        (folder / ".metadata").write_bytes(pickle.dumps(_Payload(evidence)))
        with pytest.raises(UnsafeCheckpointError, match="posix.mkdir|os.mkdir"):
            FileSystemReader(str(folder)).read_metadata()
        torch.save({"payload": _Payload(evidence)}, folder / "common.pt")
        with pytest.raises(pickle.UnpicklingError):
            torch.load(folder / "common.pt", weights_only=False)  # as Megatron calls it
    assert not evidence.exists(), "loading ran the planted code"
    torch.load(folder / "common.pt", weights_only=False)  # outside, torch.load is torch's own again
    assert evidence.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (CI runs as root)")
def test_a_full_disk_is_reported_as_such_and_the_next_launch_on_a_freed_disk_resumes(original, tiny_dataset, tmp_path):
    # Room for one checkpoint and a half: the step-2 save fits, the step-4 save fills the disk.
    checkpoint_bytes = sum(f.stat().st_size for f in (original / "checkpoints" / PREVIOUS).rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={checkpoint_bytes * 3 // 2}", "tmpfs", str(disk)], check=True)
    try:
        run_dir = disk / "run"
        # The real CLI with the default loader workers, as users run it.
        overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.num_workers=")]
        cmd = [sys.executable, "-m", "engram_train.train", *overrides, f"data.path={tiny_dataset}",
               f"experiment.run_dir={run_dir}", f"experiment.total_tokens={4 * 1024}", "experiment.checkpoint_every=2",
               "experiment.log_every=1", "experiment.keep_checkpoints=3", "experiment.wandb.mode=disabled"]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        full = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
        last_line = full.stderr.strip().splitlines()[-1]
        assert last_line.startswith(f"training stopped: {run_dir / 'checkpoints' / NEWEST}.partial: checkpoint not "
                                    "written: No space left on device (ENOSPC"), last_line
        assert f"previous checkpoint {run_dir / 'checkpoints' / PREVIOUS} is intact" in last_line
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [PREVIOUS], "the partial is removed"

        subprocess.run(["mount", "-o", f"remount,size={checkpoint_bytes * 4}", str(disk)], check=True)
        freed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert freed.returncode == 0, freed.stdout[-2000:] + freed.stderr[-2000:]
        assert f"resumed from {run_dir / 'checkpoints' / PREVIOUS} at step 2" in freed.stdout
        assert _losses(run_dir) == _losses(original), "the same curve as the run that never hit the full disk"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_the_run_folder_keeps_its_tokenizer_and_compression_table_and_a_resume_on_others_is_refused(original, tiny_dataset,
                                                                                                     tmp_path):
    import numpy as np
    from tokenizers import Tokenizer

    from engram_train.config import ConfigError

    for name in ("tokenizer.json", "compression.npy"):
        assert file_sha256(original / "assets" / name) == file_sha256(tiny_dataset / name)
    meta = json.loads((original / "checkpoints" / NEWEST / "meta.json").read_text())
    assert meta["assets"] == {"assets/tokenizer.json": file_sha256(tiny_dataset / "tokenizer.json"),
                              "assets/compression.npy": file_sha256(tiny_dataset / "compression.npy")}
    vocab = json.loads((tiny_dataset / "manifest.json").read_text())["vocab_size"]
    assert Tokenizer.from_file(str(original / "assets" / "tokenizer.json")).get_vocab_size() == vocab

    # The same token shards under another compression table: every Engram hash id would change.
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    table = np.load(data / "compression.npy")
    table[[1, 2]] = table[[2, 1]]
    np.save(data / "compression.npy", table)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["compression_sha256"] = file_sha256(data / "compression.npy")
    (data / "manifest.json").write_text(json.dumps(manifest))

    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    before = {str(p.relative_to(run_dir)): file_sha256(p) for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"assets/compression.npy \(sha256 .*\) differs from data.path's compression.npy"):
        train(_config(data, run_dir))
    assert {str(p.relative_to(run_dir)): file_sha256(p) for p in run_dir.rglob("*") if p.is_file()} == before, "untouched"
    shutil.rmtree(run_dir / "assets")  # a run folder without its copies: the checkpoint's record still refuses
    with pytest.raises(ConfigError, match=rf"{NEWEST}: trained with a compression.npy of sha256"):
        train(_config(data, run_dir))
