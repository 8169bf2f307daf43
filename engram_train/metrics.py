"""Where training metrics go: W&B (offline by default), a rich console line, and metrics.jsonl.

Only rank 0 writes; other ranks get a logger whose methods do nothing, so the train loop never
branches on rank to log. ``metrics.jsonl`` is the machine-readable record that tests, sweeps and
resume-equivalence checks read back.
"""

from __future__ import annotations

import json
import secrets
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console


class MetricsLogger:
    def __init__(self, run_dir: Path, *, config: dict, wandb_mode: str, project: str, entity: str | None, name: str, group: str = "", job_type: str = "train", tags: list[str] | None = None, enabled: bool = True,
                 resume_step: int = 0):
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=True)
        self.wandb_run = None
        self.wandb_dir: str | None = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._jsonl = self.jsonl_path.open("a")
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run_id_file = run_dir / "wandb_run_id"
            run_id = run_id_file.read_text().strip() if run_id_file.exists() else secrets.token_hex(4)
            run_id_file.write_text(run_id)
            self.wandb_run = wandb.init(
                project=project,
                entity=entity,
                name=name,
                group=group or None,
                job_type=job_type,
                tags=tags or None,
                id=run_id,
                resume="allow",
                mode=wandb_mode,
                dir=str(run_dir),
                config=config,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
            self.wandb_dir = str(Path(self.wandb_run.dir).parent)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the checkpoint resumed from, so the file holds each step once after any crash and
        relaunch; from scratch (``step`` 0, e.g. a crash before the first checkpoint) nothing is kept."""
        if not self.jsonl_path.exists():
            return
        kept = [line for line in self.jsonl_path.read_text().splitlines()
                if step and _step_of(line) is not None and _step_of(line) <= step]
        tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.jsonl_path)

    def log(self, step: int, metrics: dict[str, Any], *, console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=step)
        if console:
            self.console.print(_format(record))

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.wandb_run is not None:
            for key, value in values.items():
                self.wandb_run.summary[key] = _plain(value)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line a crash cut short."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


_CONSOLE_KEYS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "moe_load_imbalance", "table_wait_share")


def _format(record: dict[str, Any]) -> str:
    parts = [f"[bold]step {record['step']:>5}[/bold]"]
    for key in _CONSOLE_KEYS:
        if key in record:
            value = record[key]
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    gates = [f"{v:.2f}" if isinstance(v, float) else str(v) for k, v in sorted(record.items()) if k.startswith("engram_gate/")]
    if gates:
        parts.append("gate " + ",".join(gates))
    return "  ".join(parts)
