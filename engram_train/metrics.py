"""Where training metrics go: W&B (offline by default), a rich console line, and metrics.jsonl.

Only rank 0 writes; other ranks get a logger whose methods do nothing, so the train loop never
branches on rank to log. ``metrics.jsonl`` is the machine-readable record that tests, sweeps and
resume-equivalence checks read back.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from engram_train import wandb_history
from engram_train.atomic_files import atomic_write_text
from engram_train.config import WandbConfig


class MetricsLogger:
    def __init__(self, run_dir: Path, *, config: dict, wandb: WandbConfig, name: str, tags: list[str] | None = None,
                 enabled: bool = True, resume_step: int = 0, total_steps: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.console = Console(highlight=False, soft_wrap=True)
        self.wandb_run = None
        self.wandb_dir: str | None = None
        self.wandb_held_through = -1  # the last step W&B already holds from earlier segments of this run
        self._started = time.monotonic()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._jsonl = self.jsonl_path.open("a")
        self.clean_exit_code = 0  # what close() reports without an error: 0, or the requeue code when preempted
        if wandb.effective_mode() != "disabled":
            try:
                self._open_wandb(run_dir, config=config, wandb=wandb, name=name, tags=tags)
            except BaseException:  # W&B may already be running: finish it as failed and close the file
                self.close(exit_code=1)
                raise

    def _open_wandb(self, run_dir: Path, *, config: dict, wandb: WandbConfig, name: str, tags: list[str] | None) -> None:
        import wandb as wandb_sdk

        os.environ.setdefault("WANDB_SILENT", "true")
        # One W&B run id per run folder: every resume appends to the same W&B run.
        run_id_file = run_dir / "wandb_run_id"
        run_id = run_id_file.read_text().strip() if run_id_file.exists() else secrets.token_hex(4)
        atomic_write_text(run_id_file, run_id)
        self.wandb_run = wandb_sdk.init(
            project=wandb.project, entity=wandb.entity, name=name, group=wandb.group or None, job_type=wandb.job_type,
            tags=tags or None, id=run_id, resume="allow", mode=wandb.effective_mode(), dir=str(run_dir), config=config,
            settings=wandb_sdk.Settings(console="wrap" if wandb.console else "off",
                                        x_disable_stats=not wandb.system_metrics),
        )
        self.wandb_dir = str(Path(self.wandb_run.dir).parent)
        # Curves against tokens as well as steps: runs of different batch sizes compare on one axis.
        self.wandb_run.define_metric("tokens")
        for key in _TOKEN_AXIS_KEYS:
            self.wandb_run.define_metric(key, step_metric="tokens")
        self._continue_wandb_history(run_dir / "wandb", run_id)

    def _continue_wandb_history(self, wandb_dir: Path, run_id: str) -> None:
        """Leave each step in the W&B run exactly once across resumes: what earlier segments lost (a killed
        segment's buffered records) is backfilled from metrics.jsonl; what they hold is not logged again (a
        resume repeats those steps bit for bit, so the values W&B holds are the ones this run would log)."""
        held = wandb_history.held_through(wandb_dir, run_id, exclude=Path(self.wandb_dir))
        # Online, the server counts too: wandb drops any step below the one it resumes at.
        held = max(held, int(getattr(self.wandb_run, "starting_step", 0) or 0) - 1)
        self.wandb_held_through = held
        for line in self.jsonl_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("step", 0) > held:
                self.wandb_run.log(_for_wandb(record), step=record["step"])

    def _truncate_after(self, step: int) -> None:
        """Drop records past the checkpoint resumed from, so the file holds each step once after any crash and
        relaunch; from scratch (``step`` 0, e.g. a crash before the first checkpoint) nothing is kept."""
        if not self.jsonl_path.exists():
            return
        kept = [line for line in self.jsonl_path.read_text().splitlines()
                if step and _step_of(line) is not None and _step_of(line) <= step]
        atomic_write_text(self.jsonl_path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any], *, console: bool = True, eta_s: float | None = None) -> None:
        """One record at ``step`` to metrics.jsonl and W&B, and a progress line (step n/N, elapsed, ETA) to the console."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.wandb_run is not None and step > self.wandb_held_through:
            self.wandb_run.log(_for_wandb(record), step=step)
        if console:
            self.console.print(_format(record, total_steps=self.total_steps, elapsed_s=time.monotonic() - self._started,
                                       eta_s=eta_s))

    def log_checkpoint(self, folder: Path) -> None:
        """A complete checkpoint as a W&B artifact holding a reference to its folder (``wandb.log_checkpoints``).
        ``checksum=False``: W&B lists the files' paths without reading them (checkpoints are large; their own
        sha256 sums are in meta.json)."""
        if self.wandb_run is None:
            return
        import wandb

        step = int(folder.name.removeprefix("step_"))
        artifact = wandb.Artifact(f"checkpoints-{self.wandb_run.id}", type="checkpoint", metadata={"step": step})
        artifact.add_reference(Path(folder).resolve().as_uri(), name=folder.name, checksum=False)
        self.wandb_run.log_artifact(artifact, aliases=[f"step_{step}", "latest"])

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.wandb_run is not None:
            for key, value in values.items():
                self.wandb_run.summary[key] = _plain(value)

    def preempted(self, exit_code: int) -> None:
        """The run stops for requeue: W&B marks it preempting, and close() finishes it with the requeue exit code,
        so it reads as preempted (to be resumed into the same W&B run), neither finished nor failed."""
        self.clean_exit_code = exit_code
        if self.wandb_run is not None:
            self.wandb_run.mark_preempting()

    def close(self, exit_code: int | None = None) -> None:
        """Close the metrics file and finish the W&B run with the run's exit code (1 marks it failed; None: 0, or
        the requeue code after preempted()); idempotent."""
        if not self.enabled or self._jsonl.closed:
            return
        self._jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=self.clean_exit_code if exit_code is None else exit_code)


def use_own_wandb_service() -> None:
    """Make this training process start its own wandb-core. A process launched by one that used wandb inherits
    ``WANDB_SERVICE`` and attaches to that parent's core, which outlives a kill -9 of the trainer and keeps its run
    id "in use", so the resumed segment could not open the run (measured: a pytest process that had used wandb
    made its child trainers' resumes fail that way). Called once at process start by the CLI entry points."""
    os.environ.pop("WANDB_SERVICE", None)


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


#: Keys whose value is a list of counts in equal bins over [0, 1] (metrics.jsonl keeps the counts).
HISTOGRAM_PREFIX = "engram_gate_hist/"


#: Keys whose value is the tokens routed to each expert of one MoE layer (bin e: expert e).
EXPERT_LOAD_PREFIX = "moe_tokens/"


def _for_wandb(record: dict[str, Any]) -> dict[str, Any]:
    """The record with each histogram's counts as a ``wandb.Histogram`` (drawn as one, over the steps)."""
    if not any(key.startswith((HISTOGRAM_PREFIX, EXPERT_LOAD_PREFIX)) for key in record):
        return record
    import numpy as np
    import wandb

    out = dict(record)
    for key, counts in record.items():
        if key.startswith(HISTOGRAM_PREFIX):
            out[key] = wandb.Histogram(np_histogram=(np.asarray(counts), np.linspace(0.0, 1.0, len(counts) + 1)))
        elif key.startswith(EXPERT_LOAD_PREFIX):
            out[key] = wandb.Histogram(np_histogram=(np.asarray(counts), np.arange(len(counts) + 1)))
    return out


_CONSOLE_KEYS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "moe_load_imbalance", "table_wait_share")
#: Plotted against tokens in W&B (define_metric), besides the step.
_TOKEN_AXIS_KEYS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s")


def _format(record: dict[str, Any], *, total_steps: int = 0, elapsed_s: float = 0.0, eta_s: float | None = None) -> str:
    width = len(str(total_steps)) if total_steps else 5
    parts = [f"[bold]step {record['step']:>{width}}{f'/{total_steps}' if total_steps else ''}[/bold]"]
    if "tokens" in record:
        parts.append(f"tokens {record['tokens']:,}")
    for key in _CONSOLE_KEYS:
        if key in record:
            value = record[key]
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    gates = [f"{v:.2f}" if isinstance(v, float) else str(v) for k, v in sorted(record.items()) if k.startswith("engram_gate/")]
    if gates:
        parts.append("gate " + ",".join(gates))
    parts.append(f"elapsed {_clock(elapsed_s)}")
    if eta_s is not None:
        parts.append(f"ETA {_clock(eta_s)}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
