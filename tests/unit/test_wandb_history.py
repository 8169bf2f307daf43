"""Reading W&B's transaction log back: the reference is what wandb itself was asked to log (a real offline run
written by wandb-core), including a row too large for one 32 KiB block and a file cut short as a kill leaves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from engram_train import wandb_history

WRITER = textwrap.dedent("""
    import sys, wandb
    run = wandb.init(project="p", id=sys.argv[2], resume="allow", mode="offline", dir=sys.argv[1],
                     settings=wandb.Settings(console="off", x_disable_stats=True))
    for step in (0, 1, 2, 5, 6):
        run.log({"loss": 10.0 / (step + 1), "note": "x" * (70_000 if step == 2 else 3)}, step=step)
    run.finish()
""")


def _write_run(root: Path, run_id: str) -> Path:
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    subprocess.run([sys.executable, "-c", WRITER, str(root), run_id], check=True, env=env, timeout=120)
    (log,) = wandb_history.segment_logs(root / "wandb", run_id)
    return log


def test_history_steps_and_values_read_back_as_wandb_wrote_them_and_a_damaged_tail_ends_the_scan(tmp_path):
    log = _write_run(tmp_path, "r1")
    assert wandb_history.history_steps(log) == [0, 1, 2, 5, 6]
    rows = [r.history for r in wandb_history.records(log) if r.WhichOneof("record_type") == "history"]
    values = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in row.item} for row in rows]
    assert [v["loss"] for v in values] == [10.0, 5.0, 10.0 / 3, 10.0 / 6, 10.0 / 7]
    assert len(values[2]["note"]) == 70_000, "a row spanning three blocks is reassembled"
    assert wandb_history.held_through(tmp_path / "wandb", "r1") == 6
    assert wandb_history.held_through(tmp_path / "wandb", "r1", exclude=log.parent) == -1
    assert wandb_history.held_through(tmp_path / "wandb", "other") == -1

    data = log.read_bytes()
    size_of_first_rows = data.index(b"x" * 1000)  # inside the big row: the rows before it are complete
    log.write_bytes(data[:size_of_first_rows])
    assert wandb_history.history_steps(log) == [0, 1], "a file cut inside a row holds the rows before it"
    flipped = bytearray(data)
    flipped[size_of_first_rows] ^= 0xFF
    log.write_bytes(bytes(flipped))
    assert wandb_history.history_steps(log) == [0, 1], "a checksum mismatch ends the scan"
    log.write_bytes(data[:7])
    assert wandb_history.history_steps(log) == [], "only the header, as a segment killed with SIGKILL leaves it"
