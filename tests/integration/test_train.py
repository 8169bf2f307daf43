"""Tiny end-to-end runs through the real trainer: Megatron MoE backbone, host-RAM table, webdataset, W&B offline."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engram_train.train import train

from .conftest import REPO

pytestmark = pytest.mark.slow


def read_metrics(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("engram", ["default", "off"])
def test_fifty_steps_lower_the_loss(tiny_config, engram):
    cfg = tiny_config(f"engram={engram}", *(["engram.heads_per_order=2", "engram.head_dim=16", "engram.rows_per_head=1009"] if engram == "default" else []),
                      "experiment.total_tokens=51200", "experiment.checkpoint_every=25")
    summary = train(cfg)
    losses = [m["loss"] for m in read_metrics(cfg.experiment.run_dir) if "loss" in m]
    assert summary["steps"] == 50
    assert losses[-1] < losses[0] - 0.5, losses
    assert summary["final_val_loss"] < math.log(1024) - 0.5, "validation loss must fall below uniform guessing"
    checkpoint = Path(summary["checkpoint"])
    assert (checkpoint / "COMPLETE").exists() and checkpoint.name == "step_00000050"
    state = torch.load(checkpoint / "rank_0.pt", weights_only=True)
    assert state["train"]["step"] == 50
    wandb_dir = Path(summary["wandb_dir"])
    assert wandb_dir.is_dir() and any(wandb_dir.glob("*.wandb")), "a real offline W&B run is written"
    metrics = read_metrics(cfg.experiment.run_dir)[-1]
    assert "moe_load_imbalance" in metrics and "tokens_per_s" in metrics
    if engram == "default":
        assert 0.0 < metrics["engram_gate/layer_1"] < 1.0
        assert metrics["table/rows"] > 0
    else:
        assert not any(k.startswith("engram_gate/") for k in metrics)


def test_bad_config_fails_before_any_work(tmp_path):
    run_dir = tmp_path / "never"
    result = subprocess.run(
        [sys.executable, "-m", "engram_train.train", "engram.layers=[9]", f"experiment.run_dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "engram.layers=[9] is invalid" in result.stderr
    assert not run_dir.exists()


def _children_named(comm: str) -> list[int]:
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return [int(c) for c in children if Path(f"/proc/{c}/comm").exists() and Path(f"/proc/{c}/comm").read_text().strip() == comm]


def test_a_failure_mid_run_finishes_wandb_as_failed_and_leaves_no_thread_or_worker(tiny_config):
    """The loop's resources close on every exit path: here lr=1e30 makes step 2 non-finite (optim.on_nonfinite=stop)
    with the prefetch thread, a loader worker process and an offline W&B run (console captured) all live."""
    import wandb

    from engram_train.train import NonFiniteLossError

    cfg = tiny_config("optim.lr=1e30", "optim.warmup_tokens=0", "optim.grad_clip=0", "optim.on_nonfinite=stop",
                      "engram.heads_per_order=2", "engram.head_dim=16", "engram.rows_per_head=1009",
                      "engram.prefetch=overlap", "data.num_workers=1", f"experiment.total_tokens={6 * 1024}",
                      "experiment.log_every=1")
    threads = set(threading.enumerate())
    with pytest.raises(NonFiniteLossError, match="^step 2: "):
        train(cfg)
    assert wandb.run is None, "the W&B run is finished"
    run = next((Path(cfg.experiment.run_dir) / "wandb").glob("offline-run-*"))
    assert "step 1/6" in (run / "files" / "output.log").read_text(), "console captured into the W&B run"
    assert re.search(r"exit.?code:? 1\b", (run / "logs" / "debug.log").read_text()), "finished as failed"
    # W&B keeps one service connection per Python process (wandb-*, Otel*), shared by later runs: not ours.
    left = [t for t in set(threading.enumerate()) - threads if t.is_alive() and not t.name.startswith(("wandb-", "Otel"))]
    assert not left, f"threads left behind: {left}"
    assert not _children_named("pt_data_worker"), "loader worker left behind"
