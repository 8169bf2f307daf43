"""Tiny end-to-end runs through the real trainer: Megatron MoE backbone, host-RAM table, webdataset, W&B offline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
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
