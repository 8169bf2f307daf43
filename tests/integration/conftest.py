"""End-to-end fixtures: a real prepared dataset (webdataset shards + manifest) and Hydra-composed configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from engram_train.config import Config, to_config

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "assets" / "corpus"

#: A model small enough that a 50-step run takes seconds on one core.
TINY_OVERRIDES = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_experts=4",
    "model.moe_ffn_hidden_size=64",
    "engram.layers=[1]",
    "engram.heads_per_order=2",
    "engram.head_dim=16",
    "engram.rows_per_head=1009",
    "data.seq_len=64",
    "data.num_workers=0",
    "experiment.micro_batch_size=8",
    "experiment.batch_tokens=1024",
    "experiment.eval_tokens=2048",
    "experiment.log_every=5",
    "experiment.eval_every=25",
    "experiment.wandb.mode=offline",
    "optim.lr=3e-3",
    "optim.warmup_tokens=5000",
]


def prepare_dataset(out: Path, *extra: str) -> Path:
    """Run the real data pipeline CLI on the bundled corpus."""
    cmd = [
        sys.executable, "-m", "data_pipelines.prepare", "--out", str(out), "--source", str(CORPUS),
        "--vocab-size", "1024", "--seq-len", "64", "--val-fraction", "0.2", "--shards", "2", "--val-shards", "1",
        "--workers", "1", *extra,
    ]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return prepare_dataset(tmp_path_factory.mktemp("data") / "tiny")


def compose_config(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(REPO / "engram_train" / "conf"), version_base=None):
        return to_config(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture
def tiny_config(tiny_dataset, tmp_path):
    """Build a validated tiny Config for a run in tmp_path; extra Hydra overrides win."""

    def make(*overrides: str) -> Config:
        return compose_config(
            *TINY_OVERRIDES, f"data.path={tiny_dataset}", f"experiment.run_dir={tmp_path / 'run'}", *overrides
        )

    return make
