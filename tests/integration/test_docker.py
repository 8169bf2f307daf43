"""The Dockerfile builds on a local daemon and its image trains: data preparation and a tiny run inside it.

Slow (minutes; the first run here also builds a stand-in python:3.11-slim when Docker Hub is unreachable,
later runs reuse it and Docker's layer cache). Opt out with ENGRAM_SKIP_DOCKER=1; skipped with the reason
where no Docker daemon can be installed or started.
"""

from __future__ import annotations

import json
import os

import pytest

from .conftest import TINY_OVERRIDES
from .launch_helpers import (
    DockerUnavailable,
    ensure_base_image,
    make_build_context,
    run,
    start_docker_daemon,
    stop_docker_daemon,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("ENGRAM_SKIP_DOCKER") == "1", reason="ENGRAM_SKIP_DOCKER=1"),
]

BASE = "python:3.11-slim"
IMAGE = "engram-train:test"
STEPS = 10


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    """A Docker daemon with the Dockerfile's base image; stops the daemon only if this fixture started it."""
    work = tmp_path_factory.mktemp("docker")
    try:
        pid = start_docker_daemon(work / "daemon")
    except DockerUnavailable as reason:
        pytest.skip(f"Docker cannot run here: {reason}")
    try:
        try:
            ensure_base_image(BASE, work)
        except DockerUnavailable as reason:
            pytest.skip(f"no {BASE} image can be made here: {reason}")
        yield work
    finally:
        stop_docker_daemon(pid)


@pytest.mark.timeout(2400)
def test_image_builds_and_trains(docker, tmp_path):
    context = make_build_context(tmp_path / "context")
    build = run(["docker", "build", "-t", IMAGE, str(context)], env={**os.environ, "DOCKER_BUILDKIT": "0"},
                timeout=2000)
    assert build.returncode == 0, f"docker build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    config = json.loads(run(["docker", "image", "inspect", "-f", "{{json .Config}}", IMAGE]).stdout)
    assert config["Cmd"] == ["make", "train"], "the image runs `make train` by default"

    out = tmp_path / "out"
    out.mkdir()
    overrides = [*TINY_OVERRIDES, "data.path=/tmp/data", "experiment.run_dir=/out/run",
                 f"experiment.total_tokens={STEPS * 1024}", "experiment.checkpoint_every=5"]
    script = (
        "set -e; python -m data_pipelines.prepare --out /tmp/data --source tests/assets/corpus --vocab-size 1024 "
        "--seq-len 64 --val-fraction 0.2 --shards 2 --val-shards 1 --workers 1; "
        "python -m engram_train.train " + " ".join(f"'{o}'" for o in overrides)
    )
    trained = run(["docker", "run", "--rm", "-v", f"{out}:/out", IMAGE, "bash", "-c", script], timeout=1200)
    assert trained.returncode == 0, f"training in the container failed:\n{trained.stdout[-3000:]}\n{trained.stderr[-3000:]}"
    assert "training finished" in trained.stdout

    final = out / "run" / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "COMPLETE").exists()
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == STEPS
    assert (out / "run" / "wandb").is_dir(), "W&B logs offline inside the container (WANDB_MODE=offline)"
