"""Drive a ShardedEngramTable through training steps with a linear loss, as the table tests need."""

from __future__ import annotations

from engram_train.memory import ShardedEngramTable, TablePrefetcher, UniqueIds


def train_table(table: ShardedEngramTable, batches, *, lr: float, prefetch: bool = False,
                loader_dedup: bool = False) -> None:
    """For each (ids, weights): look up (optionally prefetched), loss = sum(rows * weights), push grads, step.

    ``loader_dedup``: pass the ids' ``UniqueIds`` computed beforehand, as the data loader's workers do.
    """
    prefetcher = TablePrefetcher(table) if prefetch else None
    for ids, weights in batches:
        unique = UniqueIds.of(ids) if loader_dedup else None
        if prefetcher:
            prefetcher.submit(ids, unique)
            rows = prefetcher.result()
        else:
            rows = table.lookup(ids, unique)
        (rows * weights).sum().backward()
        table.accumulate_grad(ids, rows.grad)
        table.step(lr)
