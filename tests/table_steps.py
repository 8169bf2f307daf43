"""Drive a ShardedEngramTable through training steps with a linear loss, as the table tests need."""

from __future__ import annotations

from engram_train.memory import ShardedEngramTable, TablePrefetcher


def train_table(table: ShardedEngramTable, batches, *, lr: float, prefetch: bool = False) -> None:
    """For each (ids, weights): look up (optionally prefetched), loss = sum(rows * weights), push grads, step."""
    prefetcher = TablePrefetcher(table) if prefetch else None
    for ids, weights in batches:
        if prefetcher:
            prefetcher.submit(ids)
            rows = prefetcher.result()
        else:
            rows = table.lookup(ids)
        (rows * weights).sum().backward()
        table.accumulate_grad(ids, rows.grad)
        table.step(lr)
