"""Which steps a W&B run already holds, read from its local transaction logs (``run-<id>.wandb``).

A resumed run appends to the same W&B run id. To leave each step in W&B's history exactly once it must know
what the earlier segments recorded, and the answer is not "everything up to the kill": wandb-core buffers its
transaction log and a segment killed with SIGKILL can leave only the file header behind (measured with wandb
0.31: 40 steps logged over 10 s, then kill -9: a 7-byte file). ``MetricsLogger`` therefore backfills from
metrics.jsonl what W&B lacks and skips what it has.

wandb 0.31 ships no Python reader for these files (the old ``wandb.sdk.internal.datastore`` is gone; the Go
core writes them), so the framing is read here, by hand: a 7-byte header (``:W&B``, magic 0xBEE1, version 0),
then LevelDB-log records in 32 KiB blocks, each ``crc32 (4) | length (2) | type (1) | data``, the crc being
zlib's crc32 of the data seeded with the crc of the type byte. Payloads are wandb's own ``Record`` protobufs.
A record cut short or failing its checksum ends the scan: what came before it is what W&B holds.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32 * 1024
_RECORD_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator:
    """Each complete ``wandb_internal_pb2.Record`` in one transaction log, in order; stops at a damaged tail."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(_HEADER):
        return
    offset, pending = len(_HEADER), b""
    while offset + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - offset % _BLOCK
        if left_in_block < _RECORD_HEADER:  # the block's tail is padding
            offset += left_in_block
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, offset)
        start = offset + _RECORD_HEADER
        payload = data[start:start + length]
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or len(payload) < length or \
                zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            return
        offset = start + length
        if kind in (_FULL, _FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history_steps(path: Path) -> list[int]:
    """The step of every history row in one transaction log, in the order they were written."""
    return [record.history.step.num for record in records(path) if record.WhichOneof("record_type") == "history"]


def segment_end(path: Path) -> list[tuple[str, int]]:
    """How one segment ended, as W&B recorded it: ``("preempting", 0)`` where it was marked preempting, then
    ``("exit", code)``; empty for a segment killed before wandb-core wrote either."""
    ends = [(r.WhichOneof("record_type"), r) for r in records(path)]
    return [(kind, r.exit.exit_code if kind == "exit" else 0) for kind, r in ends if kind in ("preempting", "exit")]


def segment_logs(wandb_dir: Path, run_id: str) -> list[Path]:
    """The transaction logs of every segment of run ``run_id`` below ``wandb_dir`` (one per start or resume)."""
    return sorted(Path(wandb_dir).glob(f"*-{run_id}/run-{run_id}.wandb"))


def held_through(wandb_dir: Path, run_id: str, *, exclude: Path | None = None) -> int:
    """The last step W&B holds for ``run_id`` across its earlier segments (-1 for none: step 0 is a step)."""
    steps = [step for log in segment_logs(wandb_dir, run_id) if exclude is None or log.parent != exclude
             for step in history_steps(log)]
    return max(steps, default=-1)
