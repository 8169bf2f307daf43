"""Which rank owns which rows of the logical Engram table.

All (layer, order, head) sub-tables are stacked into one logical table (row offsets from the hasher,
``NgramHasher.row_offsets``) and that table is cut into contiguous row ranges, one per rank of the table group (``RowSharding``).
Contiguous ranges make ownership a ``searchsorted`` on sorted ids and make a checkpoint shard a
plain slice, which is what lets a checkpoint be resharded to any world size.
"""

from __future__ import annotations

import torch


class RowSharding:
    """Balanced contiguous row ranges: rank r owns ``[bounds[r], bounds[r+1])``.

    The first ``num_rows % world`` ranks get one extra row, so ranges differ by at most one row.
    """

    def __init__(self, num_rows: int, world: int):
        if world < 1:
            raise ValueError(f"RowSharding: world size {world} must be >= 1")
        if num_rows < world:
            raise ValueError(
                f"Engram table of {num_rows} rows cannot be sharded over {world} ranks (each rank needs "
                f"at least one row): use fewer table shards (engram.shards <= {num_rows}) or a larger table "
                "(engram.rows_per_head)"
            )
        self.num_rows = num_rows
        self.world = world
        base, extra = divmod(num_rows, world)
        bounds = [0]
        for r in range(world):
            bounds.append(bounds[-1] + base + (1 if r < extra else 0))
        self.bounds = bounds
        self._bounds_t = torch.tensor(bounds, dtype=torch.long)

    def range(self, rank: int) -> tuple[int, int]:
        return self.bounds[rank], self.bounds[rank + 1]

    def counts_per_owner(self, sorted_ids: torch.Tensor) -> torch.Tensor:
        """How many of the ascending ``sorted_ids`` each rank owns (``[world]`` int64).

        Sorted ids are already grouped by owner, so no permutation is needed to bucket them.
        """
        cuts = torch.searchsorted(sorted_ids, self._bounds_t)
        return cuts[1:] - cuts[:-1]
