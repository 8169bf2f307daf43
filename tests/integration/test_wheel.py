"""The package as users install it: a wheel built from the repository carries its Hydra presets and the
``engram-train`` command, and trains a few steps outside the repository (no editable install, no repo on the path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest

from .conftest import REPO, TINY_OVERRIDES

pytestmark = pytest.mark.slow


def test_a_built_wheel_trains_outside_the_repository_and_answers_help_fast(tiny_dataset, tmp_path):
    # Built from a copy of what the wheel is made of: setuptools writes build/ into the source folder.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("engram_train", "data_pipelines"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("engram_train-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:  # installing a pure-Python wheel is unpacking it onto the path
        archive.extractall(site)
        entry_points = archive.read(next(n for n in archive.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "engram-train = engram_train.cli:main" in entry_points
    # The dependencies come from the test venv; the package itself only from the unpacked wheel, run from elsewhere.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import engram_train; print(engram_train.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where

    started = time.monotonic()
    shown = subprocess.run([sys.executable, "-m", "engram_train", "--help"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    help_seconds = time.monotonic() - started
    assert shown.returncode == 0, shown.stderr
    assert "experiment: sweep_tiny, sweep_tiny_3x, sweep_tiny_r10, tiny" in shown.stdout, "presets listed from the wheel's conf/"
    assert "optim.max_consecutive_skips=3  -- With on_nonfinite=skip: stop" in shown.stdout, "field docs listed"
    assert "torch" not in subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "engram_train", "--help"], cwd=tmp_path, env=env, capture_output=True,
        text=True).stderr.split(), "--help imports no torch (it would take ~16 s)"

    # Shell completion: Hydra's query answered from the wheel's conf/ without torch (one such call per Tab).
    completed = subprocess.run([sys.executable, "-X", "importtime", "-m", "engram_train", "-sc", "query=bash"], cwd=tmp_path,
                               env={**env, "COMP_LINE": "engram-train experiment.na"}, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0 and "experiment.name=" in completed.stdout.split(), completed.stdout + completed.stderr
    assert "torch" not in completed.stderr.split(), "completion imports no torch"

    run_dir = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "engram_train", *[o for o in TINY_OVERRIDES if not o.startswith("data.num_workers=")],
         f"data.path={tiny_dataset}", f"experiment.run_dir={run_dir}", f"experiment.total_tokens={3 * 1024}",
         "experiment.log_every=1", "experiment.wandb.mode=disabled"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3] and "training finished" in trained.stdout
    print(f"--help answered in {help_seconds:.2f} s")
