"""launch/slurm.sbatch on a real one-node SLURM (launch/local_slurm.sh): jobs complete, checkpoint, and a
job signalled before its time limit requeues itself and resumes from its newest checkpoint. The Hydra
submitit launcher (hydra/launcher=submitit_slurm) runs a real 2-job sweep on it."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY_OVERRIDES
from .launch_helpers import REPO, job_fields, release_requeued_job, run, wait_for


LOCAL_SLURM = REPO / "launch" / "local_slurm.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"


def _free_port_pair() -> int:
    """A port p with p and p+1 free (slurmctld and slurmd), away from the default 6817 of a real cluster."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 60000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running local SLURM; yields the environment its clients need. Stops only its own daemons."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM runs its daemons as root (SlurmUser=root); run the tests as root")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "LOCAL_SLURM_DIR": str(state), "LOCAL_SLURM_PORT": str(_free_port_pair())}
    started = run([str(LOCAL_SLURM), "start"], env=env, timeout=600)
    try:
        if started.returncode == 3:
            pytest.skip(f"no SLURM here: {started.stderr.strip()}")
        assert started.returncode == 0, f"local_slurm.sh start failed:\n{started.stdout}\n{started.stderr}"
        yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        stopped = run([str(LOCAL_SLURM), "stop"], env=env, timeout=120)
        assert stopped.returncode == 0, stopped.stderr


def _overrides(dataset: Path, run_dir: Path | str, steps: int) -> list[str]:
    return [
        *TINY_OVERRIDES,
        f"data.path={dataset}",
        f"experiment.run_dir={run_dir}",
        f"experiment.total_tokens={steps * 1024}",
        "experiment.checkpoint_every=5",
        "experiment.keep_checkpoints=100",
        "experiment.eval_every=10",
        "experiment.eval_tokens=1024",
    ]


def _submit(env: dict, sbatch_opts: list[str], overrides: list[str], log: Path) -> str:
    result = run(["sbatch", "--parsable", "--job-name=engram-test", f"--output={log}", *sbatch_opts, str(SBATCH),
                  *overrides], env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _wait_finished(job_id: str, env: dict, log: Path, timeout_s: float) -> dict:
    def finished():
        fields = job_fields(job_id, env)
        return fields if fields.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                     "OUT_OF_MEMORY"} else None

    try:
        fields = wait_for(finished, timeout_s=timeout_s, what=f"job {job_id} finishing")
    except TimeoutError:
        run(["scancel", job_id], env=env)
        raise AssertionError(f"job {job_id} did not finish in {timeout_s} s; log:\n{log.read_text()[-3000:]}")
    assert fields["JobState"] == "COMPLETED", f"job {job_id}: {fields['JobState']}; log:\n{log.read_text()[-3000:]}"
    return fields


def _assert_trained(run_dir: Path, steps: int) -> None:
    final = run_dir / "checkpoints" / f"step_{steps:08d}"
    assert (final / "COMPLETE").exists(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert {p.name for p in final.glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}, "both ranks wrote their shard"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == steps and "loss" in metrics[-1]


@pytest.mark.slow
def test_srun_per_rank_job_requeues_before_time_limit_and_resumes(slurm, tiny_dataset, tmp_path):
    """ENGRAM_LAUNCH=srun: 2 tasks = 2 ranks. The USR1 that --signal=B:USR1@120 would send near the time limit is
    sent by hand once a checkpoint exists; the job requeues and the second run resumes from that checkpoint."""
    steps, run_dir, log = 40, tmp_path / "run", tmp_path / "job.log"
    env = {**slurm, "ENGRAM_LAUNCH": "srun"}
    job = _submit(env, ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=900"],
                  _overrides(tiny_dataset, run_dir, steps), log)

    first = wait_for(lambda: sorted((run_dir / "checkpoints").glob("step_*/COMPLETE")), timeout_s=150,
                     what=f"a first checkpoint of job {job}", poll_s=0.5)
    assert job_fields(job, env)["JobState"] == "RUNNING", "the run must still be going when the signal comes"
    assert run(["scancel", "--signal=USR1", "--batch", job], env=env).returncode == 0
    wait_for(lambda: (lambda f: f.get("Restarts") == "1" and f.get("JobState") == "PENDING")(job_fields(job, env)),
             timeout_s=150, what=f"job {job} requeued")
    # SLURM holds a requeued job back ~2 minutes (BeginTime); release it as soon as it can start.
    released = release_requeued_job(job, env)
    assert released.returncode == 0, released.stderr
    fields = _wait_finished(job, env, log, timeout_s=180)

    text = log.read_text()
    assert fields["Restarts"] == "1"
    assert "time limit near" in text and "(restart 1)" in text
    # The trainer itself checkpointed at the step boundary after the signal and asked for the requeue.
    assert "trainer exited with 75" in text, text[-3000:]
    assert "so the job is requeued" in text
    resumed_step = int(text.split("resumed from ")[1].split("step_")[1][:8])
    assert resumed_step >= int(first[0].parent.name.split("_")[1]), "resumed from the newest checkpoint, not from 0"
    assert resumed_step < steps
    _assert_trained(run_dir, steps)


@pytest.mark.slow
def test_torchrun_per_node_job_completes(slurm, tiny_dataset, tmp_path):
    """Default mode: one task on the node runs launch/torchrun.sh (c10d rendezvous on the first host), 2 ranks."""
    steps, run_dir, log = 10, tmp_path / "run", tmp_path / "job.log"
    env = {**slurm, "NPROC_PER_NODE": "2"}
    job = _submit(env, ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--mem=900"],
                  _overrides(tiny_dataset, run_dir, steps), log)
    _wait_finished(job, env, log, timeout_s=180)
    text = log.read_text()
    assert "--rdzv-backend c10d" in text and "--nnodes 1" in text
    _assert_trained(run_dir, steps)


@pytest.mark.slow
def test_submitit_multirun_jobs_complete(slurm, tiny_dataset, tmp_path):
    """`-m hydra/launcher=submitit_slurm` for real: a 2-job sweep (engram.heads_per_order=2,4) becomes a SLURM
    array of two 1-task allocations; each job completes and trains in its own run dir."""
    steps, sweep, name = 5, tmp_path / "sweep", "engram-submitit-test"
    # No experiment.run_dir: in a sweep each job gets <sweep dir>/<job number> by default.
    overrides = [o for o in _overrides(tiny_dataset, "unused", steps)
                 if not o.startswith(("engram.heads_per_order=", "experiment.run_dir="))]
    cmd = [sys.executable, "-m", "engram_train.train", "-m", "hydra/launcher=submitit_slurm",
           "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
           f"hydra.launcher.name={name}", f"hydra.sweep.dir={sweep}", *overrides, "engram.heads_per_order=2,4"]
    try:
        result = run(cmd, env=slurm, cwd=REPO, timeout=240)
        assert result.returncode == 0, f"multirun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        # submitit's folder per array task: .submitit/<array id>_<task index>
        jobs = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
        assert [j.split("_")[1] for j in jobs] == ["0", "1"], jobs
        for job in jobs:
            # the result pickle (what the launcher waits for) is written just before the task exits
            def ended(job=job):
                fields = job_fields(job, slurm)
                return fields if fields.get("JobState") not in {"PENDING", "RUNNING", "COMPLETING"} else None

            fields = wait_for(ended, timeout_s=60, what=f"job {job} ending", poll_s=0.5)
            assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", fields
            assert fields["JobName"] == name and fields["NumTasks"] == "1"
        for num, heads in enumerate([2, 4]):
            run_dir = sweep / str(num)
            assert f"heads_per_order: {heads}" in (run_dir / "config.yaml").read_text()
            final = run_dir / "checkpoints" / f"step_{steps:08d}"
            assert (final / "COMPLETE").exists() and (final / "rank_0.pt").exists()
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert metrics[-1]["step"] == steps and math.isfinite(metrics[-1]["loss"])
    finally:
        run(["scancel", f"--name={name}"], env=slurm)  # nothing is left queued or running if the test failed


@pytest.mark.slow
def test_submitit_usr2_checkpoints_then_submitit_requeues_and_the_job_resumes(slurm, tiny_dataset, tmp_path):
    """submitit's time-limit warning (USR2, sent here by hand) no longer loses the steps since the last periodic
    checkpoint: the trainer saves at the next step boundary, then hands USR2 to submitit, which requeues the job;
    the requeued job resumes from that checkpoint and completes."""
    steps, sweep, name = 60, tmp_path / "sweep", "engram-submitit-usr2"
    run_dir = sweep / "0"
    overrides = [o for o in _overrides(tiny_dataset, "unused", steps)
                 if not o.startswith(("experiment.run_dir=", "experiment.checkpoint_every="))]
    cmd = [sys.executable, "-m", "engram_train.train", "-m", "hydra/launcher=submitit_slurm",
           "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
           f"hydra.launcher.name={name}", f"hydra.sweep.dir={sweep}", *overrides,
           "experiment.checkpoint_every=0", "experiment.log_every=1"]
    launcher = subprocess.Popen(cmd, env=slurm, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # .submitit/<job id>: a one-job sweep is a plain job, not an array
        job = wait_for(lambda: next((p.name for p in (sweep / ".submitit").glob("*") if re.fullmatch(r"\d+(_0)?", p.name)),
                                    None) if (sweep / ".submitit").exists() else None,
                       timeout_s=120, what="the submitit job", poll_s=0.5)
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, timeout_s=150,
                 what=f"job {job} training", poll_s=0.2)
        assert job_fields(job, slurm)["JobState"] == "RUNNING", "the run must still be going when the signal comes"
        assert run(["scancel", "--signal=USR2", job], env=slurm).returncode == 0
        wait_for(lambda: (lambda f: f.get("Restarts") == "1" and f.get("JobState") == "PENDING")(job_fields(job, slurm)),
                 timeout_s=150, what=f"job {job} requeued by submitit")
        released = release_requeued_job(job, slurm)  # skip SLURM's BeginTime hold
        assert released.returncode == 0, released.stderr
        output, _ = launcher.communicate(timeout=240)
        assert launcher.returncode == 0, f"multirun failed:\n{output[-3000:]}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        run(["scancel", f"--name={name}"], env=slurm)

    log = "\n".join(p.read_text() for p in sorted((sweep / ".submitit" / job).glob("*_log.*")))
    stopped = re.search(r"SIGUSR2: checkpoint \S+ written at step (\d+)", log)
    assert stopped, log[-3000:]
    stop_step = int(stopped.group(1))
    assert 0 < stop_step < steps
    assert "Requeued job" in log, "submitit's handler ran after the trainer's checkpoint and requeued the job"
    assert re.search(rf"resumed from \S+step_{stop_step:08d} at step {stop_step}\b", log), log[-3000:]
    assert (run_dir / "checkpoints" / f"step_{stop_step:08d}" / "COMPLETE").exists(), "the USR2 checkpoint is kept"
    assert (run_dir / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in records}) == len(records), "each step recorded once"
    logged = [r["step"] for r in records if "loss" in r]  # step 0 holds the parameter accounting
    assert logged == list(range(1, steps + 1)), "the requeued job went on from the stop step: none redone, none lost"


@pytest.mark.parametrize("partition", ["gpu"])
def test_submitit_launcher_composes(partition):
    """`hydra/launcher=submitit_slurm` resolves to submitit's SLURM launcher with our defaults, overridable."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "engram_train" / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={partition}"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == partition and launcher.nodes == 1 and launcher.tasks_per_node == 1
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout > 0, "requeue on timeout; the trainer resumes"
    assert any("MASTER_ADDR" in line for line in launcher.setup), "srun tasks need the rendezvous address"
