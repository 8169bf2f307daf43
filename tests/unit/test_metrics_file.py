"""metrics.jsonl holds each step once after any sequence of crashes and relaunches (issue 17)."""

from __future__ import annotations

import json

from engram_train.config import WandbConfig
from engram_train.metrics import MetricsLogger


def _session(run_dir, resume_step: int, steps: range, *, crash_mid_line: bool = False) -> None:
    logger = MetricsLogger(run_dir, config={}, wandb=WandbConfig(mode="disabled"), name="n", resume_step=resume_step)
    for step in steps:
        logger.log(step, {"loss": float(step)}, console=False)
    logger.close()
    if crash_mid_line:  # killed while writing the next record
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write('{"step": %d, "lo' % (steps.stop))


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_step_once_after_crashes_before_and_after_the_first_checkpoint(tmp_path):
    _session(tmp_path, 0, range(0, 3), crash_mid_line=True)  # crashed at step 3, before any checkpoint
    _session(tmp_path, 0, range(0, 6))  # relaunch from scratch; checkpoint at 4, crash after 5
    assert _steps(tmp_path) == [0, 1, 2, 3, 4, 5]
    _session(tmp_path, 4, range(5, 8), crash_mid_line=True)  # resumed from the step-4 checkpoint
    _session(tmp_path, 6, range(7, 9))
    assert _steps(tmp_path) == list(range(9))
