"""The package as users install it: a wheel built from the repository, installed by pip into a fresh venv, carries
its Hydra presets and the ``engram-train`` command, declares dependencies that resolve, answers ``--help`` without
torch, and trains a few steps outside the repository (no editable install, no repo on the path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile

import pytest

from pathlib import Path

from .conftest import REPO, TINY_OVERRIDES

pytestmark = pytest.mark.slow

_MISSING_REQUIREMENTS = """
import importlib.metadata as md
from packaging.requirements import Requirement
missing = []
for line in md.requires("engram-train") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        if not req.specifier.contains(md.version(req.name), prereleases=True):
            missing.append(f"{req} (have {md.version(req.name)})")
    except md.PackageNotFoundError:
        missing.append(str(req))
print(missing)
"""


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
    with zipfile.ZipFile(wheel) as archive:
        entry_points = archive.read(next(n for n in archive.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "engram-train = engram_train.cli:main" in entry_points

    # A fresh venv, the wheel installed into it by pip (its console script included). The dependencies are the test
    # venv's (no index here): its site-packages joins the new venv's path through a .pth line, after the venv's own,
    # and a path line does not run the test venv's editable-install hook, so engram_train comes from the wheel alone.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    new_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    (Path(new_site) / "test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(python), "-c", "import engram_train; print(engram_train.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(new_site), where
    # Every dependency the wheel declares resolves (a missing one would only fail at its first import).
    missing = subprocess.run([str(python), "-c", _MISSING_REQUIREMENTS], cwd=tmp_path, env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
    assert missing == "[]", f"declared but not installed: {missing}"
    engram_train_cmd = str(venv / "bin" / "engram-train")

    started = time.monotonic()
    shown = subprocess.run([engram_train_cmd, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    help_seconds = time.monotonic() - started
    assert shown.returncode == 0, shown.stderr
    presets = ", ".join(sorted(f.stem for f in (REPO / "engram_train" / "conf" / "experiment").glob("*.yaml")))
    assert f"experiment: {presets}" in shown.stdout, "every preset of the source tree listed from the wheel's conf/"
    assert "optim.max_consecutive_skips=3  -- With on_nonfinite=skip: stop" in shown.stdout, "field docs listed"
    for command in (["-m", "engram_train"], ["-m", "engram_train.train"]):
        timed = subprocess.run([str(python), "-X", "importtime", *command, "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True)
        assert "optim.max_consecutive_skips=3" in timed.stdout, (command, timed.stdout[-2000:])
        assert "torch" not in timed.stderr.split(), f"{command}: --help imports no torch (it would take ~16 s)"

    # Shell completion: Hydra's query answered from the wheel's conf/ without torch (one such call per Tab).
    completed = subprocess.run([str(python), "-X", "importtime", "-m", "engram_train", "-sc", "query=bash"], cwd=tmp_path,
                               env={**env, "COMP_LINE": "engram-train experiment.na"}, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0 and "experiment.name=" in completed.stdout.split(), completed.stdout + completed.stderr
    assert "torch" not in completed.stderr.split(), "completion imports no torch"

    run_dir = tmp_path / "run"
    trained = subprocess.run(
        [engram_train_cmd, *[o for o in TINY_OVERRIDES if not o.startswith("data.num_workers=")],
         f"data.path={tiny_dataset}", f"experiment.run_dir={run_dir}", f"experiment.total_tokens={3 * 1024}",
         "experiment.log_every=1", "experiment.wandb.mode=disabled"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3] and "training finished" in trained.stdout
    print(f"--help answered in {help_seconds:.2f} s")
