"""Two "nodes" for real: two network namespaces joined by a veth pair, each with its own network stack and only
the pair's private addresses (10.231.0.1/24, 10.231.0.2/24), so every byte between the nodes crosses the veth link
as it would cross a cable. On each, launch/torchrun.sh --nnodes 2 --nproc-per-node 1 (c10d rendezvous on node 0's
address, gloo bound to the veth interface with --ifname) trains with parallel.ep=2: the experts and the Engram
table are sharded across both nodes.

One test, one reference run: the two-node curve equals the same job run in one process (no expert parallelism,
the global batch accumulated; data.streams=2 makes both read the same global order of micro-batches, see
engram_train/data/loader.py); kill -9 of one node's torchrun takes its trainer with it and the other node exits
with the peer-failure message well inside parallel.timeout_s; relaunching both nodes resumes from the newest
checkpoint and the whole curve still equals the reference.

Needs root and `ip netns` (CI runs as root); skipped otherwise. The namespaces, the veth pair and every process
in them are removed at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from engram_train.checkpoint import Checkpointer
from engram_train.preemption import REQUEUE_EXIT_CODE

from .launch_helpers import REPO, alive_processes, kill_group, run, wait_for
from .test_resume import EARLY_ATOL, ELASTIC_ATOL, STEPS, _args, _losses, _run, _single, _start

pytestmark = pytest.mark.slow

TORCHRUN = REPO / "launch" / "torchrun.sh"
SUBNET = "10.231.0"
TIMEOUT_S = 60  # parallel.timeout_s: the survivor must give up well before it
SAME_JOB = ["experiment.micro_batch_size=4", "experiment.checkpoint_every=2", "data.streams=2"]
LAYOUT = ["parallel.ep=2", *SAME_JOB, f"parallel.timeout_s={TIMEOUT_S}"]


def _ip(*args: str) -> subprocess.CompletedProcess:
    result = run(["ip", *args], timeout=30)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"
    return result


def _pids_in(namespace: str) -> list[int]:
    """Every process whose network namespace is ``namespace`` (all of them were started by this test)."""
    out = run(["ip", "netns", "pids", namespace], timeout=30).stdout
    return [int(pid) for pid in out.split()]




@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair; yields (namespace, interface, address) per node."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root; run the tests as root (CI does)")
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed, so there is no `ip netns`")
    tag = f"eg{os.getpid() % 100000}"  # interface names are at most 15 characters
    hosts = [(f"{tag}-n{i}", f"{tag}n{i}", f"{SUBNET}.{i + 1}") for i in range(2)]
    made = []
    try:
        for namespace, _, _ in hosts:
            added = run(["ip", "netns", "add", namespace], timeout=30)
            if added.returncode:
                pytest.skip(f"`ip netns add` is not possible here: {added.stderr.strip()}")
            made.append(namespace)
        (ns0, if0, _), (ns1, if1, _) = hosts
        _ip("link", "add", "name", if0, "netns", ns0, "type", "veth", "peer", "name", if1, "netns", ns1)
        for namespace, ifname, address in hosts:
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", ifname)
            _ip("-n", namespace, "link", "set", ifname, "up")
        yield hosts
    finally:
        for namespace in made:
            for pid in _pids_in(namespace):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for namespace in made:
            deadline = time.monotonic() + 30
            while alive_processes(_pids_in(namespace)) and time.monotonic() < deadline:
                time.sleep(0.2)
            run(["ip", "netns", "del", namespace], timeout=30)  # takes its end of the veth pair with it


def _logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip().endswith("}")]


def test_two_nodes_over_veth_match_one_process_survive_a_dead_node_and_resume_exactly(two_hosts, tiny_dataset, tmp_path):
    started = time.monotonic()
    (ns0, _, master), _ = two_hosts
    logs = tmp_path / "logs"

    reference = tmp_path / "reference"
    _run(_single(tiny_dataset, reference, *SAME_JOB))
    expected = _losses(reference)
    assert len(expected) == STEPS
    reference_s = time.monotonic() - started

    run_dir = tmp_path / "run"

    def launch_both(session: str, port: int) -> list[tuple[subprocess.Popen, Path]]:
        nodes = []
        for rank, (namespace, ifname, _) in enumerate(two_hosts):
            cmd = ["ip", "netns", "exec", namespace, "bash", str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1",
                   "--master", f"{master}:{port}", "--node-rank", str(rank), "--ifname", ifname,
                   "--rdzv-id", "two-node-test", "--log-dir", str(logs / session), *_args(tiny_dataset, run_dir, *LAYOUT)]
            nodes.append(_start(cmd, tmp_path / f"{session}-node{rank}.log"))
        return nodes

    # 1. Both nodes train; once a checkpoint exists and a later step is logged, node 1's launcher dies (kill -9 of
    # its process group: bash and torchrun; its trainer runs in a session of its own and must die with torchrun).
    nodes = launch_both("first", 29500)
    (node0, log0), (node1, log1) = nodes
    checkpoints = Checkpointer(run_dir, rank=0, world=2, keep=2)
    try:
        wait_for(lambda: (checkpoints.latest() is not None and max(_logged_steps(run_dir), default=0) >= 3)
                 or any(p.poll() is not None for p, _ in nodes),
                 timeout_s=400, poll_s=0.1, what="a checkpoint and step 3 of the two-node run")
        assert all(p.poll() is None for p, _ in nodes), log0.read_text()[-3000:] + log1.read_text()[-3000:]
        killed_at_step = max(_logged_steps(run_dir))
        assert killed_at_step < STEPS, "the run must still be going when a node dies"
        trainers = [pid for pid in _pids_in(two_hosts[1][0]) if "engram_train.train" in " ".join(alive_processes([pid]))]
        assert trainers, alive_processes(_pids_in(two_hosts[1][0]))
        os.killpg(node1.pid, signal.SIGKILL)
        killed = time.monotonic()
        node0.wait(timeout=TIMEOUT_S + 60)
        waited = time.monotonic() - killed
        wait_for(lambda: not alive_processes(_pids_in(two_hosts[1][0])), timeout_s=15, poll_s=0.1,
                 what=f"node 1's trainer to die with its torchrun: {alive_processes(_pids_in(two_hosts[1][0]))}")
        wait_for(lambda: not alive_processes(_pids_in(ns0)), timeout_s=15, poll_s=0.1,
                 what=f"node 0's processes to exit: {alive_processes(_pids_in(ns0))}")
    finally:
        for process, _ in nodes:
            kill_group(process.pid)
    survivor = log0.read_text()
    print(f"node 1 killed after step {killed_at_step}; node 0 exited {waited:.1f} s later with {node0.returncode}")
    assert node0.returncode not in (0, REQUEUE_EXIT_CODE), survivor[-3000:]
    assert waited < TIMEOUT_S, f"node 0 took {waited:.0f} s to notice (parallel.timeout_s={TIMEOUT_S})"
    assert "PeerFailureError" in survivor and "did not report back" in survivor, survivor[-3000:]
    assert f"GLOO_SOCKET_IFNAME={two_hosts[0][1]}" in survivor, "gloo must be bound to the veth interface"
    resumed_from = checkpoints.latest()
    assert resumed_from is not None

    # Every rank kept its own log on its node, the dead node's included (only rank 0 prints the steps).
    rank_logs = [sorted((logs / "first").glob(f"node{node}-*/*/attempt_0/0/std*.log")) for node in range(2)]
    assert [[log.name for log in logs_of_node] for logs_of_node in rank_logs] == [["stderr.log", "stdout.log"]] * 2
    assert any("step  1/10" in log.read_text() for logs_of_node in rank_logs for log in logs_of_node)

    # 2. Both nodes relaunched with the same command (a fresh rendezvous port): resume from the newest checkpoint,
    # finish, and the whole curve is the one-host curve.
    nodes = launch_both("relaunch", 29501)
    try:
        for process, log in nodes:
            process.wait(timeout=600)
    finally:
        for process, _ in nodes:
            kill_group(process.pid)
    outputs = [log.read_text() for _, log in nodes]
    for (process, _), output in zip(nodes, outputs):
        assert process.returncode == 0, output[-3000:]
    assert any(f"resumed from {resumed_from}" in output for output in outputs), "".join(outputs)[-3000:]
    assert [step for step in _logged_steps(run_dir) if step > 0] == list(range(1, STEPS + 1)), "each step once"
    got = _losses(run_dir)
    print(f"losses: two nodes   {got}\n        one process {expected}\n"
          f"max |difference| {np.max(np.abs(np.array(got) - np.array(expected))):.3g}; "
          f"reference {reference_s:.0f} s, test {time.monotonic() - started:.0f} s")
    np.testing.assert_allclose(got[:5], expected[:5], rtol=0, atol=EARLY_ATOL)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ELASTIC_ATOL)
