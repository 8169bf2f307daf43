"""Backbone optimizer (AdamW with nanoGPT-style decay groups), LR schedule, and global grad clipping.

The Engram table has its own sparse optimizer inside ``engram_train.memory``; it shares this module's
schedule (times ``engram.lr_multiplier``) and the global gradient norm, so clipping treats the backbone
and the table as one model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engram_train.config import OptimConfig


def configure_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms/gains/conv kernels of width 1 do not (as in nanoGPT)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and "conv" not in name else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, foreach=True)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup, then cosine decay or warmup-stable-decay (WSD) down to ``min_lr_ratio * lr``."""

    lr: float
    min_lr_ratio: float
    warmup_steps: int
    total_steps: int
    kind: str
    decay_fraction: float

    @classmethod
    def from_config(cls, optim: OptimConfig, *, tokens_per_step: int, total_steps: int) -> "LRSchedule":
        warmup = min(total_steps, math.ceil(optim.warmup_tokens / tokens_per_step))
        return cls(optim.lr, optim.min_lr_ratio, warmup, total_steps, optim.schedule, optim.decay_fraction)

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        min_lr = self.lr * self.min_lr_ratio
        if self.kind == "wsd":
            decay_steps = max(1, round(self.decay_fraction * self.total_steps))
            decay_start = max(self.warmup_steps, self.total_steps - decay_steps)
            if step < decay_start:
                return self.lr
            progress = min(1.0, (step - decay_start) / max(1, self.total_steps - decay_start))
            return self.lr - (self.lr - min_lr) * progress
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return min_lr + 0.5 * (self.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def global_grad_norm(backbone_norm_sq: torch.Tensor, table_norm_sq: float, *, table_group=None) -> float:
    """sqrt(sum of squares) of backbone and table gradients together.

    ``backbone_norm_sq`` is already global (parallel.backbone_grad_norm_sq); the table's is over the
    rows this rank owns and is summed over the table group here.
    """
    backbone = backbone_norm_sq.clone()
    table = torch.tensor(float(table_norm_sq), dtype=torch.float64)
    if table_group is not None and dist.get_world_size(table_group) > 1:
        dist.all_reduce(table, group=table_group)
    return float((backbone + table).sqrt())


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """Scale to apply to every gradient (1.0 when clipping is off or not needed)."""
    if max_norm <= 0 or not math.isfinite(grad_norm):
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))
