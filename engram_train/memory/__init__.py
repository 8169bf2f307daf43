"""The sharded host-RAM Engram table (DESIGN.md section 4): lookup, sparse update, prefetch, rows to the GPU,
checkpoint."""

from engram_train.memory.dedup import UniqueIds
from engram_train.memory.device_rows import DeviceRows, RowTransfer
from engram_train.memory.prefetch import TablePrefetcher
from engram_train.memory.sharding import RowSharding
from engram_train.memory.sparse_optim import bytes_per_row
from engram_train.memory.table import ShardedEngramTable

__all__ = ["ShardedEngramTable", "TablePrefetcher", "RowSharding", "bytes_per_row", "UniqueIds", "RowTransfer", "DeviceRows"]
