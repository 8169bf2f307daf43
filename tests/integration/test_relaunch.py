"""Relaunching a run folder with another config: model, hash-layout and data-order keys are refused before any
work (the folder is left as it was), other changes are printed and recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engram_train.config import ConfigError
from engram_train.train import train

from .conftest import REPO, TINY_OVERRIDES

pytestmark = pytest.mark.slow


def _folder_state(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}


@pytest.fixture
def trained(tiny_config):
    """A finished two-step Engram run (its checkpoint at step 2) and a maker of relaunch configs."""
    common = [f"experiment.total_tokens={2 * 1024}", "experiment.wandb.mode=disabled"]
    cfg = tiny_config(*common)
    train(cfg)
    return Path(cfg.experiment.run_dir), lambda *overrides: tiny_config(*common, *overrides)


@pytest.mark.parametrize("override, named", [
    ("engram=off", "engram.enabled: True -> False"),
    ("engram.heads_per_order=4", "engram.heads_per_order: 2 -> 4"),
    ("engram.layers=[0]", "engram.layers: [1] -> [0]"),
    ("experiment.seed=7", "experiment.seed: 1234 -> 7"),
    # what model.precision=auto does when a run moves from a CPU to a GPU: refused before loading (DCP would fail
    # on the bf16 run's fp32 main copies, which an fp32 checkpoint does not hold)
    ("model.precision=bf16", "trained with the backbone in fp32, but this launch runs it in bf16"),
])
def test_a_changed_model_hash_layout_or_data_order_is_refused_and_the_run_folder_is_untouched(trained, override, named):
    run_dir, relaunch_config = trained
    before = _folder_state(run_dir)
    with pytest.raises(ConfigError) as refused:
        train(relaunch_config(override))
    message = str(refused.value)
    assert named in message and "step_00000002" in message and "experiment.name" in message, message
    assert "\n" not in message
    assert _folder_state(run_dir) == before


def test_other_changes_are_printed_and_recorded_and_the_run_goes_on(trained, capsys):
    run_dir, relaunch_config = trained
    capsys.readouterr()
    summary = train(relaunch_config(f"experiment.total_tokens={3 * 1024}", "optim.lr=1e-3"))
    assert summary["steps"] == 3
    out = capsys.readouterr().out
    assert "config changed since step_00000002" in out and "optim.lr: 0.003 -> 0.001" in out, out
    (entry,) = [json.loads(line) for line in (run_dir / "relaunches.jsonl").read_text().splitlines()]
    assert entry["step"] == 2 and entry["changes"]["optim.lr"] == {"old": 0.003, "new": 0.001}
    assert entry["changes"]["experiment.total_tokens"] == {"old": 2048, "new": 3072}
    assert set(entry["changes"]) == {"optim.lr", "experiment.total_tokens"}


def test_the_cli_refuses_with_one_line_and_exit_2(trained, tiny_dataset):
    run_dir, _ = trained
    cli = [o for o in TINY_OVERRIDES if not o.startswith("data.num_workers=")]
    result = subprocess.run(
        [sys.executable, "-m", "engram_train.train", *cli, f"data.path={tiny_dataset}", f"experiment.run_dir={run_dir}",
         f"experiment.total_tokens={2 * 1024}", "experiment.wandb.mode=disabled", "engram.heads_per_order=4"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "engram.heads_per_order: 2 -> 4" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
