"""Helpers for the launcher tests: ranks started by hand, a local SLURM's job states, and a Docker daemon
with a base image.

Daemons are started only when needed and reported, so a test stops exactly those.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command and capture its text output (never raises on a non-zero exit)."""
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


# ---------------------------------------------------------------- ranks without a launcher

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(cmd: list[str], *, world: int, env: dict, log_dir: Path) -> list[subprocess.Popen]:
    """Start ``world`` copies of ``cmd`` as ranks 0..world-1 of one job, with the env torchrun would set but
    no agent watching them (so a dead rank is noticed by its peers, not torn down for them).
    Rank r's output goes to ``log_dir/rank_<r>.log``. The ranks form one new process group (its id is rank 0's
    pid), as a job's tasks do: ``run_processes`` lists what of the job still runs, ``kill_group`` ends it."""
    port = free_port()
    ranks = []
    for rank in range(world):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        group = ranks[0].pid if ranks else 0
        with open(log_dir / f"rank_{rank}.log", "w") as out:
            ranks.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                          process_group=group))
    return ranks


def run_processes(group: int) -> list[str]:
    """The live (not zombie) processes of process group ``group``, with their command lines."""
    return alive_processes([int(pid) for pid in run(["pgrep", "-g", str(group)]).stdout.split()])


def alive_processes(pids: list[int]) -> list[str]:
    """Those of ``pids`` that still run (zombies excluded), with their command lines."""
    alive = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if status != "Z":
                alive.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_text().replace(chr(0), ' ')[:200]}")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return alive


def kill_group(group: int) -> None:
    """SIGKILL whatever of process group ``group`` still runs (test clean-up)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- SLURM

def job_fields(job_id: str, env: dict) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); empty once the job is forgotten."""
    out = run(["scontrol", "show", "job", job_id], env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def release_requeued_job(job_id: str, env: dict) -> subprocess.CompletedProcess:
    """Start a requeued (PENDING) job now instead of after SLURM's ~2 minute BeginTime hold.

    Released too early, slurmd refuses it ("Killing non-startable batch JobId=1: Job credential revoked", seen in
    CI): it revokes the old run's credential when that run is cleaned up, and a new credential issued within the same
    second counts as revoked (both are stamped in whole seconds). So wait until the node is idle (the old run is
    gone), then until the clock has passed the next whole second, then release."""
    def idle_since():  # "State=IDLE " only: IDLE+COMPLETING means the old run is still being cleaned up
        nodes = run(["scontrol", "show", "nodes"], env=env).stdout
        return time.time() if re.search(r"\bState=IDLE\s", nodes) else None

    idle = wait_for(idle_since, timeout_s=120, what=f"the node to be idle after job {job_id}'s requeue", poll_s=0.2)
    wait_for(lambda: time.time() >= int(idle) + 1.05, timeout_s=5, what="the next whole second", poll_s=0.05)
    return run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env)


def wait_for(predicate, *, timeout_s: float, what: str, poll_s: float = 1.0):
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")


# ---------------------------------------------------------------- Docker

class DockerUnavailable(RuntimeError):
    """Docker cannot be installed or started here; the message says why (the test skips with it)."""


def _apt_mirror() -> list[str]:
    """The Debian archive this machine's apt is configured with (its first deb822 ``URIs:`` or ``deb`` line), so the
    stand-in is bootstrapped from the same mirror; none found: debootstrap's own default."""
    for source in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]:
        if not source.is_file():
            continue
        for line in source.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "URIs:" and "security" not in words[1]:
                return [words[1]]
            uris = [w for w in words[1:] if "://" in w]
            if words and words[0] == "deb" and uris and "security" not in uris[0]:
                return uris[:1]
    return []


def _apt_install(*packages: str) -> None:
    if shutil.which("apt-get") is None:
        raise DockerUnavailable(f"apt-get is unavailable to install {' '.join(packages)}")
    if os.geteuid() != 0:
        raise DockerUnavailable(f"installing {' '.join(packages)} needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = run(["apt-get", "update", "-qq"], env=env)
    install = run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env)
    if update.returncode or install.returncode:
        raise DockerUnavailable(f"apt-get install {' '.join(packages)} failed: {(install.stderr or update.stderr)[-500:]}")


def docker_ok() -> bool:
    return shutil.which("docker") is not None and run(["docker", "info"]).returncode == 0


def start_docker_daemon(state_dir: Path) -> int | None:
    """Make `docker info` work. Returns the PID of a dockerd this call started, None if one was running."""
    if docker_ok():
        return None
    if shutil.which("dockerd") is None:
        _apt_install("docker.io", "iptables")
    state_dir.mkdir(parents=True, exist_ok=True)
    log = open(state_dir / "dockerd.log", "w")
    daemon = subprocess.Popen(["dockerd", "--pidfile", str(state_dir / "dockerd.pid")], stdout=log, stderr=log,
                              start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise DockerUnavailable(f"dockerd exited with {daemon.returncode}: "
                                    f"{(state_dir / 'dockerd.log').read_text()[-800:]}")
        if docker_ok():
            return daemon.pid
        time.sleep(0.5)
    stop_docker_daemon(daemon.pid)
    raise DockerUnavailable(f"dockerd did not answer within 60 s: {(state_dir / 'dockerd.log').read_text()[-800:]}")


def stop_docker_daemon(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag]).returncode == 0


def ensure_base_image(tag: str, work_dir: Path) -> str:
    """Make ``tag`` (python:3.11-slim) available: already there, pulled, or a local stand-in.

    Where Docker Hub is unreachable the stand-in is Debian bookworm (debootstrap minbase) with
    Python 3.11, pip and headers in a venv at /usr/local, as in the official image, plus this machine's CA
    certificates so pip inside builds trusts the same proxies. It keeps its tag, so later runs reuse it.
    Returns how the image was obtained.
    """
    if image_exists(tag):
        return "cached"
    if run(["docker", "pull", tag], timeout=300).returncode == 0:
        return "pulled"
    if shutil.which("debootstrap") is None:
        _apt_install("debootstrap")
    rootfs = work_dir / "rootfs"
    boot = run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,python3-dev,ca-certificates",
                "bookworm", str(rootfs), *_apt_mirror()])
    if boot.returncode:
        raise DockerUnavailable(f"debootstrap of the stand-in base failed: {boot.stderr[-800:]}")
    rootfs_image = "local/bookworm-python:standin"
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = run(["docker", "import", "-", rootfs_image], stdin=tar.stdout)
    tar.wait()
    if imported.returncode:
        raise DockerUnavailable(f"docker import of the stand-in base failed: {imported.stderr[-800:]}")
    shutil.rmtree(rootfs, ignore_errors=True)
    context = work_dir / "standin"
    context.mkdir(parents=True, exist_ok=True)
    for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(cert, context / cert.name)
    (context / "placeholder.crt.txt").write_text("so that the COPY below always has a source\n")
    (context / "Dockerfile").write_text(
        f"FROM {rootfs_image}\n"
        "COPY *.crt* /usr/local/share/ca-certificates/\n"
        "RUN rm -f /usr/local/share/ca-certificates/*.txt && update-ca-certificates"
        " && python3 -m venv /usr/local && /usr/local/bin/python -m pip --version\n"
        "ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin LANG=C.UTF-8\n"
        'CMD ["python3"]\n'
    )
    built = run(["docker", "build", "-q", "--label", "engram.standin=1", "-t", tag, str(context)],
                env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if built.returncode:
        raise DockerUnavailable(f"building the stand-in {tag} failed: {built.stderr[-800:]}")
    return "stand-in built"


def local_torch_wheel() -> Path | None:
    """The torch CPU wheel in pip's find-links folder, if this machine has one."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]
    for folder in folders:
        for wheel in sorted(Path(folder).glob("torch-2.13.0*cp311*.whl")) if Path(folder).is_dir() else []:
            return wheel
    return None


#: Top-level folders a user's `docker build .` never needs (.dockerignore drops them too); skipping them keeps the copy small.
_NOT_IN_CONTEXT = {".git", ".venv", ".cache", "data", "outputs", "wandb", ".pytest_cache"}


def make_build_context(dest: Path) -> Path:
    """A copy of the working tree as `docker build .` would see it, plus wheels/ with a local torch wheel.

    The tree is copied rather than listed by git: .dockerignore, not .gitignore, decides what the image gets.
    """
    shutil.copytree(
        REPO, dest,
        ignore=lambda folder, names: [n for n in names if n == "__pycache__" or (Path(folder) == REPO and n in _NOT_IN_CONTEXT)],
    )
    wheel = local_torch_wheel()
    if wheel is not None:
        (dest / "wheels").mkdir(exist_ok=True)
        shutil.copy2(wheel, dest / "wheels" / wheel.name)
    return dest
