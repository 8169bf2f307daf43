"""Surviving failures: preemption signals (to the trainer's whole process group, as schedulers send them),
a killed loader worker, kill -9 of one rank (under torchrun, and without a launcher: the survivor must fail
fast and nothing of the job may remain), half-written checkpoints, NaN losses, async checkpoints, and resuming
a TP=2 checkpoint at TP=1. Each CLI run is the real CLI (or torchrun) on a real dataset with the default
loader workers (data.num_workers=1), as users run it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_train import wandb_history
from engram_train.checkpoint import MARKER, CheckpointError, Checkpointer
from engram_train.preemption import REQUEUE_EXIT_CODE
from engram_train.train import NonFiniteLossError, train

from .conftest import REPO, TINY_OVERRIDES
from .launch_helpers import alive_processes, kill_group, run_processes, start_ranks, wait_for

pytestmark = pytest.mark.slow

STEPS = 10


#: The tiny model, with the default loader workers: worker processes are what scheduler signals and dead ranks
#: break (TINY_OVERRIDES' data.num_workers=0 keeps the in-process tests simple).
CLI_OVERRIDES = [o for o in TINY_OVERRIDES if not o.startswith("data.num_workers=")]


def _args(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    wandb = [] if any(e.startswith("experiment.wandb.mode=") for e in extra) else ["experiment.wandb.mode=disabled"]
    return [*CLI_OVERRIDES, f"data.path={dataset}", f"experiment.run_dir={run_dir}",
            f"experiment.total_tokens={STEPS * 1024}", "experiment.log_every=1", "experiment.eval_every=1000",
            *wandb, *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _single(dataset, run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "engram_train.train", *_args(dataset, run_dir, *extra)]


def _torchrun(dataset, run_dir, *extra, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "engram_train.train", *_args(dataset, run_dir, *extra)]


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, Path]:
    """Start in the background in a process group of its own (as a scheduler's job step), output to a file
    (an unread pipe would fill up and block the trainer)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True,
                                process_group=0), log


def _wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(l).get("step") == step for l in metrics.read_text().splitlines() if l):
            return
        assert process.poll() is None, f"trainer exited early with {process.returncode}"
        time.sleep(0.02)  # the signal tests act on this line while the trainer runs on: react fast
    raise TimeoutError(f"step {step} never logged in {metrics}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _descendants(pid: int) -> list[int]:
    children = _children(pid)
    return children + [d for child in children for d in _descendants(child)]


def _loader_workers(pid: int) -> list[int]:
    """The trainer's DataLoader workers (torch names their thread pt_data_worker)."""
    return [c for c in _children(pid) if Path(f"/proc/{c}/comm").read_text().strip() == "pt_data_worker"]


def _wait_for_text(log: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    wait_for(lambda: text in log.read_text() or process.poll() is not None, timeout_s=timeout, what=f"{text!r} in {log}",
             poll_s=0.2)
    assert text in log.read_text(), f"trainer exited with {process.returncode}: {log.read_text()[-3000:]}"


def test_sigterm_to_the_process_group_checkpoints_exits_for_requeue_and_resume_continues_the_same_curve(
        tiny_dataset, tmp_path):
    """scancel, SLURM preemption and torchrun signal every process of the job, loader workers included; a worker
    that dies anyway (here kill -9, as the OOM killer does) is restarted where the trainer stood."""
    reference = tmp_path / "reference"
    _run(_single(tiny_dataset, reference))

    run_dir = tmp_path / "preempted"
    process, log = _start(_single(tiny_dataset, run_dir, "experiment.wandb.mode=offline"), tmp_path / "preempted.log")
    try:
        _wait_for_step(run_dir, 2, process)
        (worker,) = _loader_workers(process.pid)
        os.kill(worker, signal.SIGKILL)
        _wait_for_text(log, f"loader worker pid {worker} (killed by SIGKILL) died", process)
        _wait_for_step(run_dir, 4, process)
        assert len(_loader_workers(process.pid)) == 1
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=300)
    finally:
        kill_group(process.pid)
    output = log.read_text()
    assert process.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    saved = Checkpointer(run_dir, rank=0, world=1, keep=2).latest()
    assert saved is not None and (saved / MARKER).exists()
    stopped_at = int(saved.name.split("_")[1])
    assert 4 <= stopped_at < STEPS
    assert "SIGTERM" in output and "DataLoader worker" not in output, output[-3000:]

    _run(_single(tiny_dataset, run_dir, "experiment.wandb.mode=offline"))
    assert _losses(run_dir) == _losses(reference), "the resumed run must continue the same loss curve exactly"
    # One W&B run: its first segment finished as preempted with the requeue code, the resumed one as finished.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    ends = [wandb_history.segment_end(segment) for segment in wandb_history.segment_logs(run_dir / "wandb", run_id)]
    assert ends == [[("preempting", 0), ("exit", REQUEUE_EXIT_CODE)], [("exit", 0)]], ends


def test_kill_9_of_one_torchrun_rank_or_sigterm_to_torchrun_then_relaunch_resumes_exactly(tiny_dataset, tmp_path):
    layout = ["parallel.ep=2", "experiment.micro_batch_size=4", "experiment.checkpoint_every=2"]
    reference = tmp_path / "reference"
    _run(_torchrun(tiny_dataset, reference, *layout))

    run_dir = tmp_path / "killed"
    launcher, _ = _start(_torchrun(tiny_dataset, run_dir, *layout), tmp_path / "killed.log")
    _wait_for_step(run_dir, 5, launcher)
    workers = _children(launcher.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    launcher.wait(timeout=300)
    assert launcher.returncode != 0, "torchrun must report the dead rank"
    checkpoints = Checkpointer(run_dir, rank=0, world=2, keep=2)
    resumed_from = checkpoints.latest()
    assert resumed_from is not None and int(resumed_from.name.split("_")[1]) >= 4

    result = _run(_torchrun(tiny_dataset, run_dir, *layout))
    assert f"resumed from {resumed_from}" in result.stdout + result.stderr
    assert _losses(run_dir) == _losses(reference)

    # SIGTERM to the launcher alone (torchrun forwards it): checkpoint, exit 75 for requeue, the same curve after.
    run_dir = tmp_path / "terminated"
    launch = ["bash", str(REPO / "launch" / "torchrun.sh"), "--nproc-per-node", "2", *_args(tiny_dataset, run_dir, *layout)]
    launcher, log = _start(launch, tmp_path / "terminated.log")
    try:
        _wait_for_step(run_dir, 3, launcher)
        os.kill(launcher.pid, signal.SIGTERM)
        launcher.wait(timeout=300)
    finally:
        kill_group(launcher.pid)
    output = log.read_text()
    assert launcher.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    stopped = Checkpointer(run_dir, rank=0, world=2, keep=2).latest()
    assert stopped is not None and f"SIGTERM: checkpoint {stopped} written" in output, output[-3000:]
    _run(launch)
    assert _losses(run_dir) == _losses(reference)


def test_a_dead_rank_makes_the_survivor_fail_fast_and_the_last_complete_checkpoint_loads(tiny_dataset, tiny_config,
                                                                                        tmp_path):
    """No launcher to tear the job down: rank 0 itself must notice rank 1's death, within seconds: rank 1's loader
    worker dies with it, so nothing keeps rank 1's connections open until parallel.timeout_s."""
    timeout_s, run_dir = 120, tmp_path / "run"
    # Async saves every step: whenever rank 1 dies, a save is in flight on rank 0 and must stay partial.
    layout = ["parallel.ep=2", "experiment.micro_batch_size=4", "experiment.checkpoint_every=1",
              "experiment.checkpoint_async=true", f"parallel.timeout_s={timeout_s}"]
    cmd = [sys.executable, "-m", "engram_train.train", *_args(tiny_dataset, run_dir, *layout)]
    ranks = start_ranks(cmd, world=2, env=_env(), log_dir=tmp_path)
    checkpoints = Checkpointer(run_dir, rank=0, world=2, keep=2)

    def saving_after_a_complete_checkpoint() -> bool:
        partial = any(d.name.endswith(".partial") for d in checkpoints.root.iterdir()) if checkpoints.root.exists() else False
        return (partial and checkpoints.latest() is not None) or any(r.poll() is not None for r in ranks)

    try:
        wait_for(saving_after_a_complete_checkpoint, timeout_s=300, what="a save after a complete checkpoint", poll_s=0.05)
        assert all(r.poll() is None for r in ranks), (tmp_path / "rank_0.log").read_text()[-3000:]
        helpers = [d for r in ranks for d in _descendants(r.pid)]  # loader workers, checkpoint writers, queue managers
        assert any(Path(f"/proc/{h}/comm").read_text().strip() == "pt_data_worker" for h in helpers if alive_processes([h]))
        ranks[1].kill()
        killed = time.monotonic()
        ranks[0].wait(timeout=timeout_s + 60)
        waited = time.monotonic() - killed
        print(f"rank 0 exited {waited:.1f} s after rank 1 was killed")
        # Nothing of the job outlives its ranks (a writer killed mid-save, a loader worker, would otherwise block
        # forever and hold the dead rank's sockets).
        wait_for(lambda: not run_processes(ranks[0].pid), timeout_s=15, poll_s=0.2,
                 what=f"the job's processes to exit: {run_processes(ranks[0].pid)}")
    finally:
        kill_group(ranks[0].pid)
    output = (tmp_path / "rank_0.log").read_text()
    assert ranks[0].returncode not in (0, REQUEUE_EXIT_CODE), output[-3000:]
    assert waited < 30, f"rank 0 took {waited:.0f} s to notice"
    assert "PeerFailureError: rank 0/2" in output and "rank(s) 1 did not report back" in output, output[-3000:]
    assert f"parallel.timeout_s={timeout_s}" in output
    assert not alive_processes(helpers)
    latest = checkpoints.latest()
    others = [d.name for d in (run_dir / "checkpoints").iterdir() if d != latest and not (d / MARKER).exists()]
    assert all(name.endswith(".partial") for name in others), others  # a save cut short stays partial
    if not others:
        # Rank 1 was killed while a save was in flight (the wait above), but that save may have been sealed before
        # rank 0 noticed; then nothing was in flight when it died, and the newest checkpoint is its last step's (or
        # the one before, where it died between logging a step and starting that step's save).
        last_logged = max(json.loads(line).get("step", 0) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
        assert int(latest.name.split("_")[1]) >= last_logged - 1, (latest, last_logged)

    # The checkpoint is whole: a single process loads all of it (backbone and table resharded to world 1).
    state, meta = _load_in_one_process(tiny_config("experiment.wandb.mode=disabled"), latest)
    assert meta["step"] == state["train"]["step"] == int(latest.name.split("_")[1]) and meta["world"] == 2


@contextlib.contextmanager
def _built_in_one_process(cfg, run_dir: Path):
    """The trainer's own build (``build_run``: model, optimizer, table, loader) at world 1, checkpointing in
    ``run_dir``; everything closed on exit."""
    from engram_train.parallel import ParallelDims, destroy_process_groups, init_process_groups
    from engram_train.preemption import PreemptionWatch
    from engram_train.train import build_run

    dims = ParallelDims.from_config(cfg)
    groups = init_process_groups(dims)
    try:
        with contextlib.ExitStack() as stack:
            watch = PreemptionWatch()
            stack.callback(watch.restore)
            yield build_run(cfg, dims, groups, Checkpointer(run_dir, rank=0, world=1, keep=2), watch, stack)
    finally:
        destroy_process_groups()


def _load_in_one_process(cfg, path: Path) -> tuple[dict, dict]:
    """Build the run at world 1 and load ``path`` into its model, optimizer and table."""
    with _built_in_one_process(cfg, path.parent.parent) as run:
        return run.checkpointer.load(path, model=run.model, optimizer=run.optimizer, table=run.table, dp_rank=0)


def test_half_written_checkpoints_are_ignored_and_another_optimizers_state_is_refused(tiny_config, tmp_path):
    cfg = tiny_config(f"experiment.total_tokens={4 * 1024}", "experiment.checkpoint_every=2", "experiment.wandb.mode=disabled")
    train(cfg)
    root = Path(cfg.experiment.run_dir) / "checkpoints"
    complete = root / "step_00000004"
    # A crash mid-save leaves a .partial folder; a folder without its marker is equally unusable.
    shutil.copytree(complete, root / "step_00000006.partial")
    shutil.copytree(complete, root / "step_00000008")
    (root / "step_00000008" / MARKER).unlink()
    checkpointer = Checkpointer(Path(cfg.experiment.run_dir), rank=0, world=1, keep=2)
    assert checkpointer.latest() == complete
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        checkpointer.load(root / "step_00000008", model=None, optimizer=None, table=None, dp_rank=0)
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        checkpointer.load(root / "missing", model=None, optimizer=None, table=None, dp_rank=0)
    # Optimizer state of the other format (optim.distributed) is refused with the setting that reads it.
    meta = json.loads((complete / "meta.json").read_text())
    assert meta["backbone_optimizer"] == "torch_adamw"
    (complete / "meta.json").write_text(json.dumps({**meta, "backbone_optimizer": "megatron_distributed"}))
    with pytest.raises(CheckpointError, match="state is megatron_distributed, this run's optimizer is torch_adamw; "
                                              "resume with optim.distributed=true"):
        _load_in_one_process(cfg, complete)


def _global_tensors(backbone: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint at its global shape, read without a process group."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(backbone))
    tensors = {key: torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in reader.read_metadata().state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}
    load(tensors, storage_reader=FileSystemReader(str(backbone)), no_dist=True)
    return tensors


def _resave_at_world_one(cfg, source: Path, target_run: Path) -> Path:
    """Load a checkpoint into a one-process run, and save that state again in ``target_run``."""
    with _built_in_one_process(cfg, target_run) as run:
        state, meta = run.checkpointer.load(source, model=run.model, optimizer=run.optimizer, table=run.table, dp_rank=0)
        step = int(source.name.removeprefix("step_"))
        return run.checkpointer.save(step, model=run.model, optimizer=run.optimizer, table=run.table, rank_state=state,
                                     meta=meta)


def test_tp2_checkpoint_resumes_at_tp1_with_the_same_losses(tiny_dataset, tiny_config, tmp_path):
    tp_run = tmp_path / "tp2"
    _run(_torchrun(tiny_dataset, tp_run, "parallel.tp=2", "experiment.checkpoint_every=5"))
    # Round trip: loaded at TP=1 and saved again, every global tensor (each expert's TP shards joined, norms,
    # Engram blocks, AdamW moments) and every table row and optimizer row comes back bit for bit.
    written = tp_run / "checkpoints" / "step_00000005"
    resaved = _resave_at_world_one(tiny_config(), written, tmp_path / "resaved")
    before, after = _global_tensors(written / "backbone"), _global_tensors(resaved / "backbone")
    assert before.keys() == after.keys() and any(".experts." in key for key in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    shards = [torch.load(written / f"table-shard-{r:05d}-of-00002.pt", weights_only=True) for r in range(2)]
    whole = torch.load(resaved / "table-shard-00000-of-00001.pt", weights_only=True)
    assert torch.equal(whole["rows"], torch.cat([s["rows"] for s in shards]))
    assert torch.equal(whole["state_ids"], torch.cat([s["state_ids"] for s in shards]))
    for name in whole["state"]:
        assert torch.equal(whole["state"][name], torch.cat([s["state"][name] for s in shards])), name

    single = tmp_path / "tp1"
    (single / "checkpoints").mkdir(parents=True)
    shutil.copytree(tp_run / "checkpoints" / "step_00000005", single / "checkpoints" / "step_00000005")
    lines = [line for line in (tp_run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 5]
    (single / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _run(_single(tiny_dataset, single))
    np.testing.assert_allclose(_losses(single), _losses(tp_run), rtol=0, atol=2e-5)


def test_non_finite_steps_stop_or_are_skipped_up_to_a_limit_without_checkpointing_over_good_ones(tiny_config, tmp_path):
    # lr=1e30: step 1 (finite) wrecks the weights, and from step 2 on every loss is non-finite.
    def cfg(name, *extra):
        return tiny_config(f"experiment.total_tokens={6 * 1024}", "optim.lr=1e30", "optim.warmup_tokens=0",
                           "optim.grad_clip=0", "experiment.checkpoint_every=1", "experiment.wandb.mode=disabled",
                           f"experiment.run_dir={tmp_path / name}", *extra)

    with pytest.raises(NonFiniteLossError, match=r"^step 2: loss=(nan|inf)"):  # as the console numbers it
        train(cfg("stop", "optim.on_nonfinite=stop"))
    # The default limit (3): steps 2, 3 and 4 are skipped, step 5 stops the run.
    with pytest.raises(NonFiniteLossError, match=r"^step 5: .*4 non-finite steps in a row \(optim.max_consecutive_skips=3\)"):
        train(cfg("limit", "optim.on_nonfinite=skip"))
    summary = train(cfg("skip", "optim.on_nonfinite=skip", "optim.max_consecutive_skips=10"))
    assert summary["skipped_steps"] == 5 and summary["steps"] == 6
    for name in ("stop", "limit", "skip"):  # only the step-1 state was saved; the skipping steps wrote nothing
        assert [p.name for p in (tmp_path / name / "checkpoints").iterdir()] == ["step_00000001"], name
    assert summary["checkpoint"].endswith("step_00000001")


def _plain(value):
    """Tensors to lists, recursively, so that == compares whole states."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same_files(a: Path, b: Path) -> None:
    """Two checkpoints of the same state hold the same bytes, except what names the run rather than the state:
    the DCP ``.metadata`` (storage path, save id), Python's unseeded ``random`` state and the wall time trained
    in rank_<r>.pt, and in meta.json the run's config and those two files' checksums."""
    from torch.distributed.checkpoint import FileSystemReader

    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for name in names:
        if name == "backbone/.metadata":
            meta_a, meta_b = (FileSystemReader(str(d / "backbone")).read_metadata() for d in (a, b))
            assert meta_a.state_dict_metadata == meta_b.state_dict_metadata and meta_a.storage_data == meta_b.storage_data
        elif name == "meta.json":  # the run's config and the checksums of the files compared here differ
            meta_a, meta_b = (json.loads((d / name).read_text()) for d in (a, b))
            for meta in (meta_a, meta_b):
                meta.pop("config")
                meta["sha256"] = {k: v for k, v in meta["sha256"].items() if k != "backbone/.metadata" and not k.startswith("rank_")}
            assert meta_a == meta_b
        elif name.startswith("rank_"):
            state_a, state_b = (torch.load(d / name, weights_only=True) for d in (a, b))
            for state in (state_a, state_b):
                state["rng"].pop("python"), state["train"].pop("train_seconds")  # wall time
            assert _plain(state_a) == _plain(state_b), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_async_checkpoint_does_not_block_matches_sync_and_resumes_the_same_curve(tiny_config, tmp_path, capsys):
    common = [f"experiment.total_tokens={4 * 1024}", "experiment.checkpoint_every=2", "experiment.log_every=1",
              "experiment.wandb.mode=disabled"]
    async_run, sync_run = tmp_path / "async", tmp_path / "sync"
    train(tiny_config(*common, f"experiment.run_dir={async_run}", "experiment.checkpoint_async=true"))
    # The step-2 save was sealed only after later steps had trained: they went on while the files were written.
    folder = re.escape(str(async_run / "checkpoints"))
    sealed = re.findall(rf"checkpoint {folder}/step_(\d+) complete at step (\d+)", capsys.readouterr().out)
    assert [int(saved) for saved, _ in sealed] == [2, 4], sealed
    assert int(sealed[0][1]) > 2, sealed

    # Resume from the async step-2 checkpoint, saving synchronously: the same curve, and the step-4
    # checkpoint of the same state is the same files either way.
    (sync_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(async_run / "checkpoints" / "step_00000002", sync_run / "checkpoints" / "step_00000002")
    shutil.copy(async_run / "metrics.jsonl", sync_run / "metrics.jsonl")
    summary = train(tiny_config(*common, f"experiment.run_dir={sync_run}"))
    assert summary["steps"] == 4
    assert _losses(sync_run) == _losses(async_run)
    _same_files(async_run / "checkpoints" / "step_00000004", sync_run / "checkpoints" / "step_00000004")


_FORKING_TRAINER = """
import multiprocessing, time
from engram_train import checkpoint
context = multiprocessing.get_context("fork")
with checkpoint._forked_writers_die_with_trainer():
    writer = context.Process(target=time.sleep, args=(600,))
    writer.start()
bystander = context.Process(target=time.sleep, args=(600,))
bystander.start()
print(writer.pid, bystander.pid, flush=True)
time.sleep(600)
"""


def test_writers_forked_while_saving_die_with_a_killed_trainer():
    """Megatron forks per-file writers (and the async save forks ours); a trainer killed mid-save must not leave
    them behind. Processes forked outside a save are untouched."""
    trainer = subprocess.Popen([sys.executable, "-c", _FORKING_TRAINER], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               text=True)
    writer, bystander = (int(pid) for pid in trainer.stdout.readline().split())
    try:
        assert alive_processes([writer]) and alive_processes([bystander])
        trainer.kill()
        trainer.wait(timeout=30)
        wait_for(lambda: not alive_processes([writer]), timeout_s=10, what="the writer to die with its trainer", poll_s=0.1)
        assert alive_processes([bystander]), "only processes forked during a save are tied to the trainer"
    finally:
        for pid in (writer, bystander):
            if alive_processes([pid]):
                os.kill(pid, signal.SIGKILL)


def _resume_copy(source: Path, step: int, run_dir: Path) -> Path:
    """A run folder holding ``source``'s checkpoint at ``step`` and its metrics up to there, as a relaunch finds it."""
    name = f"step_{step:08d}"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / name, run_dir / "checkpoints" / name)
    lines = [line for line in (source / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


#: Losses at another data-parallel size: the same micro-batches per step, summed and all-reduced over another
#: number of ranks, so float rounding differs, and Adam's normalised update lets it grow: measured between one
#: process and 2 ranks, 2e-6 over steps 1-5 and up to 1.3e-4 by step 10. A micro-batch read out of order moves
#: the step-1 loss by ~1e-2.
EARLY_ATOL, ELASTIC_ATOL = 1e-5, 5e-4


def test_one_process_and_two_ranks_read_one_order_and_a_dp2_checkpoint_resumes_at_dp1_and_dp4(tiny_dataset, tmp_path):
    """With data.streams fixed, one process (4 micro-batches accumulated per step, its loader worker reading both
    streams) and 2 ranks train the same curve from step 1; the DP=2 run's checkpoint at step 5 resumes at DP=1 and
    DP=4 (the model and table resharded through their checkpoints, the loader's position global) and continues the
    one-process curve. Plain DP; micro-batches of 4 make the global batch 4 micro-batches."""
    layout = ["experiment.micro_batch_size=4", "experiment.checkpoint_every=5", "data.streams=2"]
    reference = tmp_path / "dp1_whole"
    _run(_single(tiny_dataset, reference, *layout))
    expected = _losses(reference)
    assert len(expected) == STEPS

    two = tmp_path / "dp2"
    _run(_torchrun(tiny_dataset, two, *layout))
    saved = json.loads((two / "checkpoints" / "step_00000005" / "meta.json").read_text())["loader"]
    assert (saved["ranks"], saved["workers"], saved["batches"]) == (2, 1, 5 * 4), saved

    one = _resume_copy(two, 5, tmp_path / "dp1")
    result = _run(_single(tiny_dataset, one, *layout))
    assert "resumed from" in result.stdout + result.stderr
    four = _resume_copy(two, 5, tmp_path / "dp4")
    result = _run(_torchrun(tiny_dataset, four, *layout, nproc=4))
    assert "each worker reads 2x the rows it keeps" in result.stdout + result.stderr
    curves = {run_dir.name: _losses(run_dir) for run_dir in (two, one, four)}
    for name, losses in curves.items():
        print(f"{name}: |loss - one-process loss| per step {np.round(np.abs(np.subtract(losses, expected)), 7).tolist()}")
    for name, losses in curves.items():
        assert len(losses) == STEPS
        np.testing.assert_allclose(losses[:5], expected[:5], rtol=0, atol=EARLY_ATOL, err_msg=name)
        np.testing.assert_allclose(losses, expected, rtol=0, atol=ELASTIC_ATOL, err_msg=name)
    # The position each run saved at its end is the uninterrupted runs': the same micro-batches, the same cursors.
    end = json.loads((reference / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())["loader"]
    for run_dir in (two, one, four):
        assert json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())["loader"] == end
