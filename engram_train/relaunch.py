"""What a relaunch may change: the new config against the one its checkpoint was trained with.

Resuming continues a run, so settings that define the model, the Engram hash layout, the tokenizer or the
data order must stay as they were: a checkpoint loaded under other values either fails deep in a loader or,
worse, trains on and overwrites the run's checkpoints with another model. Those keys are refused before any
work, each named with its old and new value. Everything else (lr, schedule length, logging, evaluation,
parallel layout, which reshards) may change; the changes are printed and appended to
``<run_dir>/relaunches.jsonl``.

A run planned from ``scaling.allocation_ratio`` is compared on its planned model (the config the trainer
receives and the checkpoint stores), so a new ratio is refused exactly when it plans another model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from engram_train.config import Config, ConfigError

#: Keys a resumed run must keep: they shape the model and its parameters, the hash layout and table
#: optimizer state, the token stream (tokenizer via the shards, order via seed, workers, shuffle).
FIXED = (
    "model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.ffn_hidden_size",
    "model.num_experts", "model.moe_router_topk", "model.moe_ffn_hidden_size",
    "model.moe_shared_expert_intermediate_size", "model.moe_layer_freq", "model.rotary_base",
    "model.make_vocab_size_divisible_by",
    "engram.enabled", "engram.layers", "engram.ngram_orders", "engram.heads_per_order", "engram.head_dim",
    "engram.rows_per_head", "engram.seed", "engram.conv_kernel_size", "engram.gate_signed_sqrt",
    "engram.projection_bias", "engram.null_memory", "engram.optimizer", "engram.reset_at_doc_boundary",
    "data.seq_len", "data.num_workers", "data.streams", "data.shuffle_buffer", "data.train_urls",
    "experiment.seed", "optim.distributed",
)

#: Keys that name the run rather than configure it.
_IGNORED = ("experiment.name", "experiment.run_dir", "experiment.wandb.name")


def config_record(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain values, as checkpoints store it (``meta.json["config"]``)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def saved_meta(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; empty where it cannot be read (damage is reported when it is loaded)."""
    try:
        return json.loads((checkpoint / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def saved_config(checkpoint: Path) -> dict[str, Any] | None:
    """The config a checkpoint was trained with: its ``meta.json``, else (older checkpoints) the run's config.yaml.

    None where meta.json cannot be read: the checkpoint is damaged, which loading reports (and falls back from).
    """
    meta = saved_meta(checkpoint)
    if not meta:
        return None
    if "config" in meta:
        return meta["config"]
    run_yaml = checkpoint.parent.parent / "config.yaml"
    return yaml.safe_load(run_yaml.read_text()) if run_yaml.exists() else None


def changes_since(cfg: Config, checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """Keys whose value differs from ``checkpoint``'s config: ``{key: (old, new)}``, allowed ones only.

    Raises ``ConfigError`` (one line) naming every fixed key that changed and how to start a new run instead.
    """
    saved = saved_config(checkpoint)
    if saved is None:
        return {}
    old, new = _flat(saved), _flat(config_record(cfg))
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if k not in _IGNORED and old.get(k) != new.get(k)}
    refused = [f"{k}: {o!r} -> {n!r}" for k, (o, n) in changed.items() if k in FIXED]
    if refused:
        run_dir = checkpoint.parent.parent
        raise ConfigError(
            f"{run_dir} holds a run whose checkpoint {checkpoint.name} was trained with other settings that a resumed "
            f"run cannot change ({'; '.join(refused)}). Relaunch with the checkpoint's values to continue it, or start a "
            f"new run with another experiment.name (or experiment.run_dir); {run_dir} was left untouched"
        )
    return changed


def check_same_precision(precision: str, checkpoint: Path, meta: dict[str, Any]) -> None:
    """Refuse to resume a bf16 run in fp32 or the reverse (``model.precision=auto`` picks by device, so moving a run
    between a CPU and a GPU switches it): the checkpoint holds the other layout of weights and optimizer state
    (bf16 weights with fp32 main copies, or fp32 weights only)."""
    saved = meta.get("precision")  # absent in checkpoints written before it was recorded
    if saved is not None and saved != precision:
        raise ConfigError(
            f"{checkpoint}: trained with the backbone in {saved}, but this launch runs it in {precision} "
            f"(model.precision=auto picks bf16 on a GPU, fp32 on a CPU): relaunch with model.precision={saved} to "
            "continue it, or start a new run (experiment.name / experiment.run_dir)")


def describe(changes: dict[str, tuple[Any, Any]], checkpoint: Path) -> str:
    return f"config changed since {checkpoint.name}: " + "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items())


def record(run_dir: Path, changes: dict[str, tuple[Any, Any]], checkpoint: Path, step: int) -> None:
    """Append the relaunch's changes to ``<run_dir>/relaunches.jsonl``."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": checkpoint.name, "step": step,
             "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
    with open(run_dir / "relaunches.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
