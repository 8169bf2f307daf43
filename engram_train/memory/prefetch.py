"""Prefetch table rows on a background thread (``engram.prefetch=overlap``).

The hash ids of step t are known as soon as its batch arrives, long before the first Engram layer
runs, so the lookup (dedup, three gloo all-to-alls, row gathers) can run on a worker thread while
the main thread loads data and runs the layers below the first Engram layer. gloo collectives and
torch's CPU kernels release the GIL, so the two really overlap.

No stale rows: the table bumps ``version`` whenever its rows change (``step``, ``load``) and waits
for an in-flight prefetch before changing them; ``result()`` redoes the lookup when the version
moved since the prefetch began. The rows returned are therefore always those a synchronous
``lookup`` at the time of ``result()`` would return.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from engram_train.memory.dedup import UniqueIds
from engram_train.memory.device_rows import DeviceRows, RowTransfer
from engram_train.memory.table import ShardedEngramTable


def core_is_free_for_prefetch(device: torch.device, ranks_on_this_host: int) -> bool:
    """Whether a background lookup can overlap anything (``engram.prefetch=auto``).

    With the backbone on a GPU the host cores wait for it. On a CPU whose cores all run intra-op threads
    the thread has nothing to overlap and only preempts OpenMP workers (measured in
    bench/engram_overhead.py: 0-5% slower steps, run to run, than looking up on the critical path).
    """
    if device.type == "cuda":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return torch.get_num_threads() * ranks_on_this_host < cores


def _one_thread() -> None:
    """The prefetch thread's own kernels run single-threaded (the setting is per calling thread).

    Otherwise each of its gathers would start a full OpenMP team next to the compute's, and on a CPU
    whose cores the compute already occupies, a preempted OpenMP worker stalls a whole parallel region.
    """
    torch.set_num_threads(1)


class TablePrefetcher:
    """``submit(ids)`` starts a lookup in the background; ``result()`` returns its rows.

    One lookup is in flight at a time; every rank must call ``submit``/``result`` at the same
    points of the step (the lookup is collective).
    """

    def __init__(self, table: ShardedEngramTable, transfer: RowTransfer | None = None):
        """``transfer``: with the backbone on a GPU, the thread also starts each lookup's copy to the device."""
        self.table = table
        self.transfer = transfer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch", initializer=_one_thread)
        self._future = None
        self._ids: torch.Tensor | None = None
        self._version = -1

    @classmethod
    def for_device(cls, table: ShardedEngramTable, device: torch.device) -> "TablePrefetcher":
        """For a backbone on ``device``: on a GPU the thread also starts each lookup's copy to it."""
        return cls(table, RowTransfer.for_device(device) if device.type == "cuda" else None)

    def submit(self, ids: torch.Tensor, unique: UniqueIds | None = None) -> None:
        if self._future is not None:
            raise RuntimeError("TablePrefetcher.submit: the previous prefetch was never collected; call result() first")
        self.table.wait_for_prefetch()
        self._ids, self._version = ids, self.table.version
        self._future = self._pool.submit(self._run, ids, unique)
        self.table.prefetch_started(self._future)

    def _run(self, ids: torch.Tensor, unique: UniqueIds | None) -> torch.Tensor | DeviceRows:
        t0 = time.perf_counter()
        rows = self.table.gather_rows(ids, unique)
        self.table.count(lookup_s=time.perf_counter() - t0)
        return self.transfer.to_device(rows) if self.transfer is not None else rows

    def result(self) -> torch.Tensor | DeviceRows:
        """Rows of the submitted ids, waiting if needed: a host leaf with ``requires_grad``, or with a ``transfer``
        their copy on its way to the device."""
        if self._future is None:
            raise RuntimeError("TablePrefetcher.result: nothing submitted")
        t0 = time.perf_counter()
        future, ids = self._future, self._ids
        self._future, self._ids = None, None
        try:
            rows = future.result()
        finally:
            self.table.prefetch_collected(future)
        self.table.count(wait_s=time.perf_counter() - t0)
        if self.table.version != self._version:
            rows = self.table.lookup(ids)  # rows changed after the prefetch began: never serve stale ones
            rows = self.transfer.to_device(rows) if self.transfer is not None else rows
        return rows

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __del__(self):
        self._pool.shutdown(wait=False)
