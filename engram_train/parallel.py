"""Process groups: Megatron's TP/EP/DP groups for the backbone, and a separate gloo group for the table.

``ParallelDims`` is the one object that knows every group size; it is built once from the config and
the launcher's environment (torchrun or SLURM), validated with errors that say how to fix the launch,
and nothing else in the code base reads RANK/WORLD_SIZE.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engram_train.config import Config, ConfigError


def _launcher_env() -> tuple[int, int, int]:
    """(rank, local_rank, world) from torchrun, else SLURM (one task per rank), else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def cuda_device_index(local_rank: int) -> int:
    """This rank's GPU: its local rank among the devices it sees, or device 0 where it sees exactly one (srun
    --gpus-per-task=1 or GPU binding gives each task its own GPU, seen as device 0 whatever its SLURM_LOCALID)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank < count:
        return local_rank
    raise ConfigError(f"local rank {local_rank} has no GPU of its own: this process sees {count} GPUs "
                      f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most {count} "
                      f"ranks per node, or give each task one GPU (srun --gpus-per-task=1)")


def _refuse_cpu_when_gpus_were_asked_for() -> None:
    """A launch that asked for GPUs (launch/torchrun.sh --gpus, slurm.sbatch with a GPU allocation: both export
    ENGRAM_GPUS_PER_NODE) must not train on CPU because torch sees none (a CPU-only torch, no driver, a job step
    without its GPUs): falling back silently would train on CPU while the allocation's GPUs sit idle."""
    asked = os.environ.get("ENGRAM_GPUS_PER_NODE", "").strip()
    if asked not in ("", "0") and not torch.cuda.is_available():
        raise ConfigError(
            f"the launch asked for {asked} GPU(s) per node (ENGRAM_GPUS_PER_NODE={asked}) but torch {torch.__version__} "
            f"sees no GPU on {socket.gethostname()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "refusing to train on CPU: request GPUs from the scheduler (sbatch --gpus-per-node), install torch's CUDA "
            "build, or unset ENGRAM_GPUS_PER_NODE to train on CPU")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ParallelDims:
    """Group sizes. world = tp x dp; experts are split over ep ranks inside each dp group."""

    world: int
    rank: int
    local_rank: int
    tp: int
    ep: int
    table_shards: int
    backend: str
    timeout_s: int

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_config(cls, cfg: Config, *, world: int | None = None, rank: int | None = None) -> "ParallelDims":
        env_rank, local_rank, env_world = _launcher_env()
        world = env_world if world is None else world
        rank = env_rank if rank is None else rank
        p, m = cfg.parallel, cfg.model
        _refuse_cpu_when_gpus_were_asked_for()
        backend = p.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        shards = cfg.engram.shards or world
        dims = cls(world, rank, local_rank, p.tp, p.ep, shards, backend, p.timeout_s)
        dims.validate(num_experts=m.num_experts, num_heads=m.num_attention_heads)
        return dims

    def validate(self, *, num_experts: int, num_heads: int) -> None:
        if self.world % self.tp:
            raise ConfigError(
                f"parallel.tp={self.tp} does not divide the world size {self.world}; "
                f"launch a multiple of {self.tp} processes (torchrun --nproc-per-node) or lower parallel.tp"
            )
        if num_heads % self.tp:
            raise ConfigError(f"parallel.tp={self.tp} must divide model.num_attention_heads={num_heads}")
        if self.ep > 1 and num_experts == 0:
            raise ConfigError(f"parallel.ep={self.ep} needs MoE layers; model.num_experts is 0")
        if num_experts and num_experts % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} must divide model.num_experts={num_experts}")
        if self.world % (self.tp * self.ep):
            raise ConfigError(
                f"parallel.tp x parallel.ep = {self.tp * self.ep} must divide the world size {self.world}; "
                "experts are split over ep ranks inside the data-parallel group"
            )
        if self.table_shards != self.world:
            raise ConfigError(
                f"engram.shards={self.table_shards}: every rank holds a table shard, so it must equal the "
                f"world size {self.world} (or 0 for 'every rank')"
            )


@dataclass
class ProcessGroups:
    """Live groups: ``table`` is gloo over CPU tensors even when the backbone runs NCCL on GPUs."""

    dims: ParallelDims
    table: dist.ProcessGroup | None
    data_parallel_rank: int
    data_parallel_world: int


def init_process_groups(dims: ParallelDims) -> ProcessGroups:
    """Start torch.distributed (a one-process group when not launched by torchrun/SLURM) and Megatron's groups."""
    from megatron.core import parallel_state

    if torch.cuda.is_available():  # before any NCCL communicator exists, so each binds to this rank's device
        torch.cuda.set_device(cuda_device_index(dims.local_rank))
    if not dist.is_initialized():
        if dims.world == 1 and "MASTER_ADDR" not in os.environ:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            init_method = "env://"
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.setdefault("RANK", str(dims.rank))
            os.environ.setdefault("WORLD_SIZE", str(dims.world))
        dist.init_process_group(
            backend=dims.backend,
            init_method=init_method,
            rank=dims.rank,
            world_size=dims.world,
            timeout=datetime.timedelta(seconds=dims.timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        expert_model_parallel_size=dims.ep,
        distributed_timeout_minutes=dims.timeout_s / 60,  # a float is fine (timedelta); no 1-minute floor
    )
    table_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=dims.timeout_s))
    return ProcessGroups(
        dims=dims,
        table=table_group,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_world=parallel_state.get_data_parallel_world_size(),
    )


class PeerFailureError(RuntimeError):
    """A collective failed because another rank died or stopped answering."""


_PEER_FAILURE_SIGNS = ("gloo", "connection", "timed out", "timeout", "nccl", "peer", "socket")


def explain_peer_failure(error: RuntimeError, dims: ParallelDims) -> RuntimeError:
    """Turn a backend error from a collective into a message that names the likely dead rank and what to do.

    Only the backends' own errors (torch's DistError family, and the plain RuntimeError gloo raises) are read:
    the framework's errors (DataError, CheckpointError, ...) say what to fix themselves and keep their type, even
    when their text happens to contain "timeout" or "connection".
    """
    text = str(error).lower()
    from_backend = type(error) is RuntimeError or isinstance(error, dist.DistError)
    if dims.world == 1 or not from_backend or not any(s in text for s in _PEER_FAILURE_SIGNS):
        return error
    silent = _silent_ranks(dims)
    if silent:
        suspects = f"rank(s) {', '.join(map(str, silent))} did not report back, so most likely died or stalled"
    else:
        suspects = "every rank reported back, so one most likely stalled"
    return PeerFailureError(
        f"rank {dims.rank}/{dims.world}: a collective failed ({str(error).splitlines()[0][:200]}); {suspects} "
        f"(a stalled rank fails its peers after parallel.timeout_s={dims.timeout_s}s). Check those ranks' logs, then "
        "relaunch the same command: training resumes from the newest complete checkpoint"
    )


def _silent_ranks(dims: ParallelDims, wait_s: float = 3.0) -> list[int]:
    """Ranks that do not check in on the rendezvous store within ``wait_s`` after a failed collective.

    Every surviving rank reaches this point soon after a peer dies (its connections close), so those
    missing are the dead or hung ones. When the store itself is gone, its host (rank 0) is the one.
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"peer_failure/{dims.rank}", "alive")
        deadline = time.monotonic() + min(wait_s, dims.timeout_s)
        while True:
            silent = [r for r in range(dims.world) if not store.check([f"peer_failure/{r}"])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store is unreachable: its host died
        return [0] if dims.rank != 0 else []


def on_every_rank(flag: bool, group=None) -> bool:
    """Collective over ``group`` (default: all ranks): True only where ``flag`` holds on every rank."""
    return _agree(flag, dist.ReduceOp.MIN, group)


def on_any_rank(flag: bool, group=None) -> bool:
    """Collective over ``group`` (default: all ranks): True everywhere once ``flag`` holds on one rank."""
    return _agree(flag, dist.ReduceOp.MAX, group)


def collective_device(group=None) -> str:
    """Where a tensor for a collective over ``group`` must live: NCCL reduces GPU tensors only."""
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


def _agree(flag: bool, op, group) -> bool:
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int, device=collective_device(group))
    dist.all_reduce(value, op=op, group=group)
    return bool(value.item())


def destroy_process_groups() -> None:
    """Tear down cleanly: without it world-2 gloo runs sometimes abort at exit."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
