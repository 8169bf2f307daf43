"""metrics.jsonl holds each step once after any sequence of crashes and relaunches (issue 17); W&B finishes a
preempted run as preempting (exit 75) and a logger that fails to start as failed."""

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


def _exit_records(run_dir, expected: list, timeout_s: float = 60.0) -> list[tuple[str, int]]:
    """The preempting and exit records of the run's W&B transaction log, read back through wandb's protobufs, once
    they equal ``expected`` or after ``timeout_s``. finish() returns when wandb-core has the exit record; a core shared
    with earlier runs of this process writes it to the file a moment later, so the test waits for it."""
    import time

    from engram_train import wandb_history

    deadline = time.monotonic() + timeout_s
    while True:
        (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        found = wandb_history.segment_end(log)
        if found == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_wandb_finishes_preempted_with_the_requeue_code_and_failed_when_opening_fails(tmp_path, monkeypatch):
    """A run stopped for requeue reads as preempted in W&B (not finished, not failed); a failure after wandb.init
    inside the logger's own start leaves no W&B run open."""
    import pytest
    import wandb

    from engram_train import metrics
    from engram_train.preemption import REQUEUE_EXIT_CODE

    offline = WandbConfig(mode="offline", console=False, system_metrics=False)
    logger = MetricsLogger(tmp_path / "preempted", config={}, wandb=offline, name="n")
    logger.log(1, {"loss": 1.0}, console=False)
    logger.preempted(REQUEUE_EXIT_CODE)
    logger.close()
    assert wandb.run is None
    preempted = [("preempting", 0), ("exit", REQUEUE_EXIT_CODE)]
    assert _exit_records(tmp_path / "preempted", preempted) == preempted

    def unreadable(*args, **kwargs):
        raise OSError("wandb/offline-run-x/run-x.wandb: Input/output error")

    monkeypatch.setattr(metrics.wandb_history, "held_through", unreadable)
    with pytest.raises(OSError, match="Input/output error"):
        MetricsLogger(tmp_path / "broken", config={}, wandb=offline, name="n")
    assert wandb.run is None, "the W&B run opened before the failure is finished"
    assert _exit_records(tmp_path / "broken", [("exit", 1)]) == [("exit", 1)]
