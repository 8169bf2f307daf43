"""Run a function on N real gloo ranks (torch.multiprocessing) and collect each rank's return value."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests import kernel_cache_dir

os.environ.setdefault("TORCH_EXTENSIONS_DIR", kernel_cache_dir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = fn(rank, world, *args)
    torch.save(result, Path(out_dir) / f"rank_{rank}.pt")


def run_ranks(world: int, fn, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns the per-rank results in rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world, _free_port(), out_dir, fn, args), nprocs=world, join=True, start_method="spawn")
        return [torch.load(Path(out_dir) / f"rank_{r}.pt", weights_only=True) for r in range(world)]
