"""A launch that asked for GPUs never trains on CPU: the trainer itself refuses when torch sees none."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

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


def test_each_rank_binds_its_own_gpu_or_is_told_why_not(monkeypatch):
    """torchrun / srun with every GPU visible: local rank r takes device r. srun --gpus-per-task=1 (or GPU binding):
    every task sees one device, index 0, whatever its SLURM_LOCALID. More ranks than visible GPUs: a one-line error
    instead of CUDA's 'invalid device ordinal' (or two ranks silently sharing a GPU)."""
    import pytest
    import torch

    from engram_train.config import ConfigError
    from engram_train.parallel import cuda_device_index

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert [cuda_device_index(r) for r in range(8)] == list(range(8))
    with pytest.raises(ConfigError, match=r"^local rank 8 has no GPU of its own: this process sees 8 GPUs"):
        cuda_device_index(8)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [cuda_device_index(r) for r in range(4)] == [0, 0, 0, 0]


def test_the_gpu_checks_refuse_a_machine_without_a_gpu_and_their_dry_run_checks_the_kit(tmp_path):
    """launch/gpu_check.sh (make gpu-check) on a machine whose GPUs are hidden: exit 2 with the reason before any
    test runs, so no one reads skipped GPU tests as passed. --dry-run runs both steps there (the GPU tests skip,
    the bench runs its CPU configuration) and leaves the logs and the JSON in --out; with --test-timeout the bench
    runs even when the tests do not finish in time."""
    import json

    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    refused = subprocess.run(["bash", "launch/gpu_check.sh", "--out", str(tmp_path / "refused")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == ("launch/gpu_check.sh: torch sees no CUDA GPU here; run this on "
                                                       "a GPU node (or --dry-run to check the kit)")
    assert "megatron.core 0.16.1" in (tmp_path / "refused" / "env.txt").read_text()
    assert not (tmp_path / "refused" / "test_gpu.log").exists()

    # A wheelhouse holding a package this environment lacks and a broken "numpy": installed first on PYTHONPATH it
    # would shadow the real one and fail every import, so only the first may be installed.
    wheelhouse = tmp_path / "wheelhouse"
    _write_wheel(wheelhouse, "engram_probe", "1.0", "MARK = 1\n")
    _write_wheel(wheelhouse, "numpy", "0.0.1", "raise ImportError('the wheelhouse shadowed the node numpy')\n")
    out = tmp_path / "dry"
    dry = subprocess.run(["bash", "launch/gpu_check.sh", "--dry-run", "--wheelhouse", str(wheelhouse), "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert "--wheelhouse: installing 1 of 2 wheels (the node has the rest)" in dry.stdout
    junit = (out / "test_gpu.xml").read_text()
    tests, skipped = (int(re.search(rf'{key}="(\d+)"', junit)[1]) for key in ("tests", "skipped"))
    assert tests >= 6 and skipped == tests, "every GPU test collected, and skipped without a GPU"
    assert "Engram-MoE / MoE step time:" in (out / "bench_gpu.log").read_text()
    assert json.loads((out / "gpu.json").read_text())["device"].startswith("cpu (")

    # --test-timeout: tests interrupted past it (1 s: pytest is still importing torch), the bench runs anyway.
    out = tmp_path / "short"
    short = subprocess.run(["bash", "launch/gpu_check.sh", "--dry-run", "--test-timeout", "1", "--out", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert short.returncode == 124, short.stdout[-3000:] + short.stderr[-3000:]
    assert "== the tests ran past --test-timeout 1 s and were interrupted" in (out / "test_gpu.log").read_text()
    assert "Engram-MoE / MoE step time:" in (out / "bench_gpu.log").read_text()


def _write_wheel(folder: Path, name: str, version: str, init: str) -> None:
    """A minimal pure-Python wheel of package ``name`` (PEP 427 layout)."""
    folder.mkdir(exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": init,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
