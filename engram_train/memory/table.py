"""ShardedEngramTable: the Engram rows as a row-sharded parameter server in host RAM.

One logical table (all layers x orders x heads, stacked at ``NgramHasher.row_offsets``) is cut into contiguous row
ranges over a gloo group; each rank allocates only its own rows and their optimizer state.

Forward (``lookup``): dedup ids -> bucket by owner (sorted unique ids are already grouped) ->
all-to-all counts and ids -> owners gather rows -> all-to-all rows back -> expand with the inverse.
Backward (``accumulate_grad``): coalesce grads per unique id -> all-to-all grads to owners (the
lookup's routing -- counts and ids -- is reused, so this is one collective, not three), where they
wait until ``step`` runs the sparse optimizer on the touched rows. ``step`` is local: no
collective, so a clipped/averaged update needs only the caller's all-reduce of ``grad_norm_sq``.

World size 1 is the same code; the exchange just skips the collectives (``group=None`` works
without ``torch.distributed``).

Collective order: every method that communicates first waits for an in-flight prefetch (see
``prefetch.py``), so all ranks issue the table's collectives in the same order.
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engram_train.memory.dedup import UniqueIds, dedup
from engram_train.memory.exchange import RowExchange
from engram_train.memory.sharding import RowSharding
from engram_train.memory.sparse_optim import OPTIMIZERS, TABLE_DTYPES, build_optimizer, bytes_per_row

#: Rows per init block: row r's initial value depends only on (seed, r // INIT_BLOCK_ROWS, r), so
#: every world size starts from the same table.
INIT_BLOCK_ROWS = 1 << 16


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def advise_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages under a big, not yet touched tensor.

    Lookups hit random rows: with 4 KiB pages every row of a multi-GB table is a TLB miss as well
    as a cache miss (measured: 2x slower per id at 100M rows than at 1M). THP is usually in
    ``madvise`` mode, so it has to be requested. Best effort: a no-op where unsupported.
    """
    nbytes = t.numel() * t.element_size()
    if nbytes < 16 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


def init_rows(start: int, end: int, dim: int, std: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """N(0, std^2) rows ``[start, end)``, generated per fixed block so no rank builds the full table."""
    out = torch.empty((end - start, dim), dtype=dtype)
    advise_huge_pages(out)
    if end <= start:
        return out
    for block in range(start // INIT_BLOCK_ROWS, (end - 1) // INIT_BLOCK_ROWS + 1):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (2**63))
        values = torch.randn((INIT_BLOCK_ROWS, dim), generator=gen).mul_(std)
        lo, hi = max(start, block * INIT_BLOCK_ROWS), min(end, (block + 1) * INIT_BLOCK_ROWS)
        out[lo - start : hi - start] = values[lo - block * INIT_BLOCK_ROWS : hi - block * INIT_BLOCK_ROWS]
    return out


@dataclass
class _Plan:
    """A lookup's unique ids (ascending), where each input id lands in them, and once exchanged, its
    routing: (send counts, recv counts, local ids of the rows peers asked us for)."""

    shape: torch.Size
    unique: torch.Tensor
    inverse: torch.Tensor
    error: str | None
    route: tuple[list[int], list[int], torch.Tensor] | None = None



def _zero_stats() -> dict[str, float]:
    return {"lookup_s": 0.0, "wait_s": 0.0, "grad_s": 0.0, "step_s": 0.0, "lookups": 0, "updated_rows": 0}

class ShardedEngramTable:
    """Row-sharded Engram table with sparse optimizer, living in host RAM.

    Args:
        num_rows: rows of the logical table (the sum of all sub-tables, ``NgramHasher.num_rows``).
        dim: row width.
        group: gloo process group of the table shards; ``None`` = one rank, no communication.
        optimizer: ``adam`` | ``rowwise_adam`` | ``rowwise_adagrad`` (``engram.optimizer``).
        lr: default learning rate of ``step`` (the caller normally passes the scheduled one).
        table_dtype: ``float32`` | ``bfloat16`` row storage; optimizer math and state are fp32.
        init_std, seed: N(0, init_std^2) init, deterministic per (seed, global row).
        use_cpu_adam: run Adam through DeepSpeed's CPU kernel (falls back to torch if unavailable).
        fingerprint: identity of the hashing config; stored in checkpoints and checked on load.
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        group: dist.ProcessGroup | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        table_dtype: str = "float32",
        init_std: float = 0.02,
        seed: int = 0,
        use_cpu_adam: bool = True,
        fingerprint: dict | None = None,
    ):
        if num_rows < 1 or dim < 1:
            raise ValueError(f"ShardedEngramTable: num_rows={num_rows} and dim={dim} must both be >= 1")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"engram.optimizer={optimizer!r} is invalid: choose one of {', '.join(OPTIMIZERS)}")
        if table_dtype not in TABLE_DTYPES:
            raise ValueError(f"engram.table_dtype={table_dtype!r} is invalid: choose one of {', '.join(TABLE_DTYPES)}")
        self.num_rows, self.dim = num_rows, dim
        self.optimizer_name, self.table_dtype = optimizer, table_dtype
        self.lr = lr
        # JSON round trip: the form checkpoints store, so tuples and lists compare equal on load.
        self.fingerprint = json.loads(json.dumps(fingerprint or {}, sort_keys=True))
        self.exchange = RowExchange(group)
        self.rank, self.world = self.exchange.rank, self.exchange.world
        self.sharding = RowSharding(num_rows, self.world)
        self.start, self.end = self.sharding.range(self.rank)
        self.rows = init_rows(self.start, self.end, dim, init_std, seed, TABLE_DTYPES[table_dtype])
        self.optim = build_optimizer(optimizer, self.end - self.start, dim, betas, eps, use_cpu_adam)
        self.step_count = 0
        #: Bumped whenever rows change (step, load): a prefetch started earlier is stale.
        self.version = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_unique = True
        self._plans: dict[int, tuple[weakref.ref, int, _Plan]] = {}
        self._inflight: Future | None = None
        self._last_unique_ratio = 1.0
        self._stats_lock = threading.Lock()  # the prefetch thread adds to the counters too
        self.reset_stats()

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the rows, and the dtype lookups return them in (``engram.table_dtype``)."""
        return self.rows.dtype

    # -- forward ---------------------------------------------------------------------------------
    def lookup(self, ids: torch.Tensor, unique: UniqueIds | None = None) -> torch.Tensor:
        """Rows for integer ``ids[...]`` as a ``[..., dim]`` leaf in the table's dtype with ``requires_grad``.

        ``unique``: ``UniqueIds.of(ids)`` when the data loader already computed it; skips the sort.
        """
        self.wait_for_prefetch()
        t0 = time.perf_counter()
        out = self.gather_rows(ids, unique)
        dt = time.perf_counter() - t0
        self.count(lookup_s=dt, wait_s=dt)
        return out

    def gather_rows(self, ids: torch.Tensor, unique: UniqueIds | None = None) -> torch.Tensor:
        """The lookup itself, without waiting for a prefetch: what the prefetch thread runs (it touches no
        pending-gradient state). Callers on the main thread use ``lookup``."""
        plan = self._plan(ids, unique)
        send, recv, owned = self._route(plan)
        rows = self.rows.index_select(0, owned)  # shipped in the table's dtype: bf16 rows are half the bytes
        got = self.exchange.send(rows, recv, send)
        out = got.index_select(0, plan.inverse).view(*plan.shape, self.dim)
        self.count(lookups=1)
        self._last_unique_ratio = plan.unique.numel() / max(1, plan.inverse.numel())
        return out.requires_grad_(True)

    # -- backward --------------------------------------------------------------------------------
    def accumulate_grad(self, ids: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Send the grads of one lookup (``rows.grad``) to the rows' owners; may be called repeatedly."""
        self.wait_for_prefetch()
        t0 = time.perf_counter()
        plan = self._plan(ids)
        if grad is None:
            raise ValueError("accumulate_grad: grad is None; call it after backward with the looked-up rows' .grad")
        if tuple(grad.shape) != (*plan.shape, self.dim):
            raise ValueError(
                f"accumulate_grad: grad shape {tuple(grad.shape)} does not match ids {tuple(plan.shape)} x dim {self.dim}"
            )
        flat = grad.detach().reshape(-1, self.dim).float()
        coalesced = torch.zeros((plan.unique.numel(), self.dim)).index_add_(0, plan.inverse, flat)
        send, recv, owned = self._route(plan)
        got = self.exchange.send(coalesced, send, recv)
        self._pending.append((owned, got))
        # One chunk from one rank is already unique; anything else may repeat rows.
        self._pending_unique = len(self._pending) == 1 and self.world == 1
        self.count(grad_s=time.perf_counter() - t0)

    def _coalesced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pending (unique local ids, summed grads); rows sent twice (peers, micro-batches) are summed."""
        if not self._pending:
            return torch.empty(0, dtype=torch.long), torch.empty((0, self.dim))
        if not self._pending_unique:
            ids = torch.cat([p[0] for p in self._pending])
            grads = torch.cat([p[1] for p in self._pending])
            unique, inverse = dedup(ids)
            summed = torch.zeros((unique.numel(), self.dim)).index_add_(0, inverse, grads)
            self._pending, self._pending_unique = [(unique, summed)], True
        return self._pending[0]

    def grad_norm_sq(self) -> float:
        """Sum of squares of this rank's pending (owned, coalesced) grads; all-reduce it for the norm."""
        _, grads = self._coalesced()
        return float(grads.double().square().sum()) if grads.numel() else 0.0

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        """Sparse optimizer step on owned touched rows with ``grads * grad_scale``; clears the grads.

        ``lr`` is the table's learning rate (already multiplied by ``engram.lr_multiplier``);
        ``None`` uses the constructor's. Every rank must call it (it counts the global step used for
        bias correction) even when it owns no touched rows. No communication.
        """
        self.wait_for_prefetch()  # a prefetch may still be reading the rows we are about to write
        t0 = time.perf_counter()
        ids, grads = self._coalesced()
        if grad_scale != 1.0:
            grads = grads * grad_scale
        self.step_count += 1
        self.optim.update(self.rows, ids, grads, self.lr if lr is None else lr, self.step_count)
        self._pending, self._pending_unique = [], True
        self.version += 1
        self.count(step_s=time.perf_counter() - t0, updated_rows=ids.numel())

    def zero_grad(self) -> None:
        self._pending, self._pending_unique = [], True

    # -- routing ---------------------------------------------------------------------------------
    def _plan(self, ids: torch.Tensor, unique: UniqueIds | None = None) -> _Plan:
        """Dedup + validate ``ids``, cached per ids tensor (and unmodified version) for the backward.

        The backward reuses the cached routing instead of exchanging counts and ids again. Whether
        it hits depends only on the sequence of calls and on the lifetime of the ids tensors, which
        every rank runs identically, so all ranks skip (or issue) the same collectives.
        """
        key = id(ids)
        hit = self._plans.get(key)
        if hit is not None and hit[0]() is ids and hit[1] == ids._version:
            return hit[2]
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ShardedEngramTable: ids must be an integer tensor, got {ids.dtype}")
        if unique is None:
            unique = UniqueIds.of(ids)
        elif unique.inverse.numel() != ids.numel():
            raise ValueError(f"lookup: unique ids were computed for {unique.inverse.numel()} ids, got {ids.numel()} ids")
        error = None
        if unique.unique.numel():
            lo, hi = int(unique.unique[0]), int(unique.unique[-1])  # ascending
            if lo < 0 or hi >= self.num_rows:
                error = (
                    f"Engram ids out of range on table rank {self.rank}: min {lo}, max {hi}, but the table has "
                    f"{self.num_rows} rows (valid 0..{self.num_rows - 1}); the hashing config (engram.layers, "
                    "ngram_orders, heads_per_order, rows_per_head) must match the table it was built with"
                )
        plan = _Plan(ids.shape, unique.unique, unique.inverse, error)
        if len(self._plans) >= 16:
            self._plans = {k: v for k, v in self._plans.items() if v[0]() is not None}
            if len(self._plans) >= 16:
                self._plans.pop(next(iter(self._plans)))
        self._plans[key] = (weakref.ref(ids), ids._version, plan)
        return plan

    def _route(self, plan: _Plan) -> tuple[list[int], list[int], torch.Tensor]:
        """Exchange counts and ids; returns (send counts, recv counts, ids we own that peers asked for).

        A rank with bad ids sends -1 counts instead of raising alone, so every rank raises together
        rather than the healthy ones hanging in the next collective.
        """
        if plan.route is not None:
            return plan.route
        if plan.error is None:
            send = self.sharding.counts_per_owner(plan.unique)
        else:
            send = torch.full((self.world,), -1, dtype=torch.long)
        recv = self.exchange.counts(send)
        if plan.error is not None:
            raise ValueError(plan.error)
        bad = (recv < 0).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"Engram ids out of range on table rank(s) {bad} (see their error); no row was updated")
        send_l, recv_l = send.tolist(), recv.tolist()
        owned = self.exchange.send(plan.unique, send_l, recv_l) - self.start
        plan.route = (send_l, recv_l, owned)
        return plan.route

    def prefetch_started(self, future: Future) -> None:
        """A background lookup (``gather_rows`` on another thread) is in flight: row changes wait for it."""
        self._inflight = future

    def prefetch_collected(self, future: Future) -> None:
        if self._inflight is future:
            self._inflight = None

    def wait_for_prefetch(self) -> None:
        """Wait for an in-flight prefetch so collectives keep one order on every rank."""
        inflight = self._inflight
        if inflight is not None:
            wait_futures([inflight])
            self._inflight = None

    # -- accounting ------------------------------------------------------------------------------
    def count(self, **amounts: float) -> None:
        """Add to the timing counters (thread-safe: the prefetch thread counts its lookups)."""
        with self._stats_lock:
            for key, amount in amounts.items():
                self._stats[key] += amount

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = _zero_stats()

    def stats(self, reset: bool = True) -> dict:
        """Memory and timing counters since the last reset, for the trainer's logs.

        ``wait_s``: time the caller was blocked on lookups (whole lookups without prefetch, only the
        un-hidden remainder with it); ``lookup_s``: total lookup latency (also on the prefetch
        thread); ``wait_s / step time`` is the share of the step spent waiting for the table.
        """
        rows_bytes = self.rows.numel() * self.rows.element_size()
        out = {
            "rows": self.num_rows,
            "local_rows": self.end - self.start,
            "touched_rows": self.optim.num_slots,
            "bytes_per_rank": rows_bytes + self.optim.bytes_allocated(),
            "bytes_per_row": bytes_per_row(self.optimizer_name, self.table_dtype, self.dim),
            "unique_ratio": self._last_unique_ratio,
            "step": self.step_count,
        }
        with self._stats_lock:  # read and reset together: a count from the prefetch thread is never lost
            out.update(self._stats)
            if reset:
                self._stats = _zero_stats()
        return out

    # -- checkpoint ------------------------------------------------------------------------------
    def restore(self, rows: torch.Tensor, local_ids: torch.Tensor, state: dict[str, torch.Tensor], *,
                step: int) -> None:
        """Replace this rank's rows, the optimizer rows of ``local_ids`` and the step count (a checkpoint's, as
        ``table_files.load_table`` assembles them); pending gradients are dropped and a prefetch is stale."""
        self.wait_for_prefetch()
        self.optim.import_state(local_ids, state)
        self.rows = rows
        self.step_count = step
        self.zero_grad()
        self.version += 1
