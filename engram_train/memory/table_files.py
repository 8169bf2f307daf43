"""The table's files in a checkpoint folder: what each holds, how a rank writes its own, how any world size reads them.

    table-meta.json                       shape, dtype, optimizer, fingerprint, step, shard ranges
    table-shard-00000-of-00002.pt         rows [start, end) + optimizer rows of touched rows only

One way to write them: ``snapshot_table`` at a step boundary, then ``write_table_files`` on every rank (table rank
0 writes the meta beside its shard). Writing is rank-local, so the Checkpointer runs it in the trainer or in a
forked asynchronous writer alike; a folder is whole only once every rank has written, which is what the
Checkpointer's marker says. Loading reads only the shards whose ranges overlap the rank's new range (with
``mmap``, so only the needed rows are paged in), and every check runs before anything is replaced: a
mismatched checkpoint leaves the table untouched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engram_train.atomic_files import atomic_torch_save, atomic_write_text

if TYPE_CHECKING:
    from engram_train.memory.table import ShardedEngramTable

META = "table-meta.json"
FORMAT = 1


def _shard_name(rank: int, world: int) -> str:
    return f"table-shard-{rank:05d}-of-{world:05d}.pt"


@dataclass(frozen=True)
class TableSnapshot:
    """A rank's table files as of one step: its shard file's name and content and, on table rank 0, the meta.

    The shard holds the live rows (no copy): a synchronous save writes them before training goes on, and an
    asynchronous writer is a forked process, which sees them as they were at the fork.
    """

    shard_name: str
    shard: dict
    meta: dict | None


def snapshot_table(table: ShardedEngramTable) -> TableSnapshot:
    """What this rank's table files will hold, taken at a step boundary (after any prefetch has finished)."""
    table.wait_for_prefetch()
    touched, state = table.optim.export_state()
    shard = {
        "start": table.start,
        "end": table.end,
        "rows": table.rows,
        "state_ids": touched + table.start,  # global ids, so any later range can pick its own
        "state": state,
    }
    meta = {
        "format": FORMAT,
        "num_rows": table.num_rows,
        "dim": table.dim,
        "table_dtype": table.table_dtype,
        "optimizer": table.optimizer_name,
        "fingerprint": table.fingerprint,
        "step": table.step_count,
        "world": table.world,
        "bounds": table.sharding.bounds,
        "files": [_shard_name(r, table.world) for r in range(table.world)],
    }
    return TableSnapshot(_shard_name(table.rank, table.world), shard, meta if table.rank == 0 else None)


def write_table_files(snapshot: TableSnapshot, folder: str | os.PathLike) -> None:
    """This rank's table files into ``folder``, each atomically: its shard and (table rank 0) the meta. No collective."""
    folder = Path(folder)
    atomic_torch_save(snapshot.shard, folder / snapshot.shard_name)
    if snapshot.meta is not None:
        atomic_write_text(folder / META, json.dumps(snapshot.meta, indent=1, sort_keys=True))


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = Path(path) / META
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} not found: {path} is not a table checkpoint or its save did not finish"
        )
    return json.loads(meta_path.read_text())


def check_compatible(table: ShardedEngramTable, meta: dict) -> None:
    """Raise ValueError naming every field where the checkpoint and the run disagree."""
    problems = []
    if (meta["num_rows"], meta["dim"]) != (table.num_rows, table.dim):
        problems.append(
            f"table shape {meta['num_rows']}x{meta['dim']} (checkpoint) vs {table.num_rows}x{table.dim} (run): "
            "engram.layers/ngram_orders/heads_per_order/rows_per_head/head_dim must match the checkpoint's"
        )
    fp_ckpt, fp_run = meta.get("fingerprint", {}), table.fingerprint
    for key in sorted(set(fp_ckpt) | set(fp_run)):
        if fp_ckpt.get(key) != fp_run.get(key):
            problems.append(f"hashing config {key}: {fp_ckpt.get(key)!r} (checkpoint) vs {fp_run.get(key)!r} (run)")
    if meta["optimizer"] != table.optimizer_name:
        problems.append(f"engram.optimizer: {meta['optimizer']!r} (checkpoint) vs {table.optimizer_name!r} (run)")
    if problems:
        raise ValueError("table checkpoint does not match this run's config; " + "; ".join(problems))


def load_table(table: ShardedEngramTable, path: str | os.PathLike) -> None:
    """Load table files written at any world size; no collective: each rank assembles its new range from the
    overlapping old shards.

    A different ``table_dtype`` is allowed (rows are cast); everything else must match.
    """
    root = Path(path)
    meta = read_meta(root)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{root / META}: unknown table checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    check_compatible(table, meta)
    bounds = meta["bounds"]
    missing = [name for name in meta["files"] if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(f"table checkpoint {root} is missing shard files {missing}")
    rows = torch.empty_like(table.rows)
    ids_parts, state_parts = [], []
    for old_rank, name in enumerate(meta["files"]):
        lo, hi = max(bounds[old_rank], table.start), min(bounds[old_rank + 1], table.end)
        if lo >= hi:
            continue
        shard = torch.load(root / name, mmap=True, weights_only=True)
        old_start = shard["start"]
        rows[lo - table.start : hi - table.start] = shard["rows"][lo - old_start : hi - old_start].to(rows.dtype)
        keep = (shard["state_ids"] >= lo) & (shard["state_ids"] < hi)
        ids_parts.append(shard["state_ids"][keep] - table.start)
        state_parts.append({k: v[keep] for k, v in shard["state"].items()})
    names = table.optim.state.keys()
    local_ids = torch.cat(ids_parts) if ids_parts else torch.empty(0, dtype=torch.long)
    state = {k: torch.cat([p[k] for p in state_parts]) for k in names} if state_parts else {
        k: torch.empty((0, *v.shape[1:])) for k, v in table.optim.state.items()
    }
    table.restore(rows, local_ids, state, step=int(meta["step"]))
