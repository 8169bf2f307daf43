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

from engram_train import checkpoint
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
    assert 0 < summary["train_seconds"] < summary["session_wall_seconds"], "wall time adds start-up, eval, checkpoints"
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
    # Expert load per layer, of the last step: every token goes to top-k experts in each MoE layer.
    m = cfg.model
    for layer in range(m.num_layers):
        routed = metrics[f"moe_tokens/layer_{layer}"]
        assert len(routed) == m.num_experts and sum(routed) == cfg.experiment.batch_tokens * m.moe_router_topk, routed
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


def test_an_error_the_trainer_passes_on_keeps_its_own_cause(tmp_path):
    """The peer-failure diagnosis leaves the framework's own errors alone, and their cause with them: a damaged
    manifest's DataError still points at the JSON error below it."""
    from engram_train.data.manifest import DataError

    from .conftest import TINY_OVERRIDES, compose_config

    damaged = tmp_path / "data"
    damaged.mkdir()
    (damaged / "manifest.json").write_text('{"format": ')
    cfg = compose_config(*TINY_OVERRIDES, f"data.path={damaged}", f"experiment.run_dir={tmp_path / 'run'}")
    with pytest.raises(DataError, match="manifest.json: not valid JSON") as raised:
        train(cfg)
    assert isinstance(raised.value.__cause__, json.JSONDecodeError), raised.value.__cause__


def _children() -> list[int]:
    return [int(c) for c in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # gone meanwhile
        return ""


def _children_named(comm: str) -> list[int]:
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return [int(c) for c in children if Path(f"/proc/{c}/comm").exists() and Path(f"/proc/{c}/comm").read_text().strip() == comm]


def _writer_that_never_finishes(*args, **kwargs) -> None:
    threading.Event().wait()  # a checkpoint writer stuck on a slow filesystem


@pytest.mark.timeout(300)  # without the checkpointer's abandon on the exit stack, train() waits on the writer forever
def test_a_failure_mid_run_finishes_wandb_as_failed_and_leaves_no_thread_or_worker(tiny_config, monkeypatch):
    """The loop's resources close on every exit path: here lr=1e30 makes step 2 non-finite (optim.on_nonfinite=stop)
    with the prefetch thread, a loader worker process, step 1's background checkpoint writer and an offline W&B run
    (console captured) all live."""
    import wandb

    from engram_train.train import NonFiniteLossError

    cfg = tiny_config("optim.lr=1e30", "optim.warmup_tokens=0", "optim.grad_clip=0", "optim.on_nonfinite=stop",
                      "engram.heads_per_order=2", "engram.head_dim=16", "engram.rows_per_head=1009",
                      "engram.prefetch=overlap", "data.num_workers=1", f"experiment.total_tokens={6 * 1024}",
                      "experiment.log_every=1", "experiment.checkpoint_async=true", "experiment.checkpoint_every=1")
    threads = set(threading.enumerate())
    children = set(_children())
    monkeypatch.setattr(checkpoint, "_write_rank_files", _writer_that_never_finishes)  # inherited by the fork
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
    # step 1's background checkpoint writer (a fork of this process, as the loader workers; still writing) is gone,
    # and reaped: killed but not waited for it stays a zombie (state Z, empty cmdline) until some later fork reaps it
    forks = [c for c in set(_children()) - children if _cmdline(c) == _cmdline(os.getpid()) or _state(c) == "Z"]
    assert not forks, f"processes forked by the run left behind: {forks}"


def test_kill_9_and_resume_leave_one_wandb_run_holding_every_step_once(tiny_dataset, tmp_path):
    """A W&B segment killed with SIGKILL loses what wandb-core had buffered; the resumed segment backfills it from
    metrics.jsonl and logs on from there, so W&B's history (read back from its own transaction logs) holds every
    step exactly once, with the values metrics.jsonl holds. A third segment resumed from an older checkpoint replays
    steps W&B already holds and must not log them again. Shipped defaults: a loader worker, W&B offline."""
    import shutil
    import signal
    import time

    from engram_train import wandb_history

    from .conftest import TINY_OVERRIDES
    from .launch_helpers import kill_group, wait_for

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "engram_train.train", *[o for o in TINY_OVERRIDES if not o.startswith("data.num_workers=")],
           f"data.path={tiny_dataset}", f"experiment.run_dir={run_dir}", f"experiment.total_tokens={16 * 1024}",
           "experiment.log_every=1", "experiment.eval_every=8", "experiment.checkpoint_every=4",
           "experiment.wandb.mode=offline", "experiment.wandb.log_checkpoints=true"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "killed.log", "w") as out:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0)
    try:
        steps_logged = lambda: [m["step"] for m in read_metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
        wait_for(lambda: 7 in steps_logged() or process.poll() is not None, timeout_s=300, what="step 7 logged", poll_s=0.05)
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        kill_group(process.pid)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    # The newest checkpoint removed (as after renaming a damaged one step_<n>.damaged): resume at step 12, replay
    # 13-16 (bit for bit), which the finished second segment flushed to W&B.
    shutil.rmtree(run_dir / "checkpoints" / "step_00000016")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "at step 12" in result.stdout + result.stderr

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    segments = wandb_history.segment_logs(run_dir / "wandb", run_id)
    assert len(segments) == 3, "one W&B run id, one transaction log per segment"
    rows, checkpoint_refs = {}, []
    for log in segments:
        for record in wandb_history.records(log):
            if record.WhichOneof("record_type") == "artifact":
                checkpoint_refs += [(record.artifact.type, e.ref) for e in record.artifact.manifest.contents]
            if record.WhichOneof("record_type") == "history":
                step = record.history.step.num
                assert step not in rows, f"step {step} is in W&B's history twice"
                rows[step] = {}
                for item in record.history.item:  # a histogram's fields are nested: [key, "_type"], [key, "values"]
                    *path, leaf = list(item.nested_key) or [item.key]
                    target = rows[step]
                    for key in path:
                        target = target.setdefault(key, {})
                    target[leaf] = json.loads(item.value_json)
    expected = read_metrics(run_dir)
    assert sorted(rows) == [m["step"] for m in expected] == list(range(17))
    assert [rows[m["step"]].get("loss") for m in expected] == [m.get("loss") for m in expected]
    assert rows[16]["val_loss"] == expected[-1]["val_loss"]
    # experiment.wandb.log_checkpoints: every complete checkpoint as a reference-only artifact (the second segment's
    # 8, 12 and 16; the killed one's step-4 record may be lost with its buffer, as its history was).
    checkpoints = (run_dir / "checkpoints").resolve()
    folders = {Path(ref.removeprefix("file://")).relative_to(checkpoints).parts[0]  # raises if it is elsewhere
               for kind, ref in checkpoint_refs if kind == "checkpoint"}
    assert folders >= {"step_00000008", "step_00000012", "step_00000016"}, checkpoint_refs
    # At each evaluation (steps 8 and 16) the gate histogram of every Engram layer, as a W&B histogram.
    for step in (8, 16):
        record = next(m for m in expected if m["step"] == step)
        hists = {k: v for k, v in record.items() if k.startswith("engram_gate_hist/")}
        assert hists and all(len(c) == 32 and sum(c) > 0 for c in hists.values()), record.keys()
        for key, counts in hists.items():
            assert rows[step][key]["_type"] == "histogram" and rows[step][key]["values"] == counts
