"""Which rank owns which rows of the logical Engram table.

All (layer, order, head) sub-tables are stacked into one logical table (``TableLayout``) and that
table is cut into contiguous row ranges, one per rank of the table group (``RowSharding``).
Contiguous ranges make ownership a ``searchsorted`` on sorted ids and make a checkpoint shard a
plain slice, which is what lets a checkpoint be resharded to any world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TableLayout:
    """Row offsets of stacked sub-tables (one per Engram layer x n-gram order x hash head).

    ``sizes[i]`` is the row count of sub-table ``i`` (in the order the hashing code enumerates
    them); sub-table ``i`` occupies global rows ``offsets[i] .. offsets[i] + sizes[i]``.
    """

    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ValueError("TableLayout needs at least one sub-table size")
        for i, size in enumerate(self.sizes):
            if size < 1:
                raise ValueError(f"TableLayout: sub-table {i} has {size} rows; every sub-table needs >= 1 row")

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for size in self.sizes:
            out.append(acc)
            acc += size
        return tuple(out)

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)

    def offsets_tensor(self) -> torch.Tensor:
        return torch.tensor(self.offsets, dtype=torch.long)

    def to_global(self, local_ids: torch.Tensor) -> torch.Tensor:
        """Map per-sub-table ids ``[..., num_subtables]`` to global row ids (adds each offset)."""
        if local_ids.shape[-1] != len(self.sizes):
            raise ValueError(
                f"TableLayout.to_global: last dim {local_ids.shape[-1]} != {len(self.sizes)} sub-tables"
            )
        return local_ids.long() + self.offsets_tensor()


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
