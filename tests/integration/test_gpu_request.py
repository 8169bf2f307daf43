"""A launch that asked for GPUs never trains on CPU: the trainer itself refuses when torch sees none."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import REPO


def test_the_trainer_refuses_to_fall_back_to_cpu_when_the_launch_asked_for_gpus(tiny_dataset, tmp_path):
    # What launch/torchrun.sh --gpus 1 and slurm.sbatch with a GPU allocation export; the GPUs hidden, as on a node
    # whose driver is missing (this is how the test runs on a GPU machine too).
    env = {**os.environ, "ENGRAM_GPUS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    run_dir = tmp_path / "never"
    result = subprocess.run([sys.executable, "-m", "engram_train.train", f"data.path={tiny_dataset}",
                             f"experiment.run_dir={run_dir}", "experiment.wandb.mode=disabled"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = result.stderr.strip().splitlines()
    assert errors[-1].startswith("config error: the launch asked for 1 GPU(s) per node (ENGRAM_GPUS_PER_NODE=1) but "
                                 "torch"), result.stderr[-2000:]
    assert "refusing to train on CPU" in errors[-1] and "unset ENGRAM_GPUS_PER_NODE" in errors[-1]
    assert not run_dir.exists(), "refused before any work"
