"""MoE load-balance monitoring: tokens routed to each expert, and Megatron's aux loss per step.

Counts come from forward hooks on Megatron's routers (their routing map is exact), so the numbers
describe what the dispatcher really did rather than a recomputation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from engram_train.metrics import EXPERT_LOAD_PREFIX


class MoELoadTracker:
    def __init__(self, model: torch.nn.Module):
        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self.num_experts = self.routers[0].config.num_moe_experts if self.routers else 0
        self.counts = torch.zeros(len(self.routers), max(1, self.num_experts), dtype=torch.float64)
        for index, router in enumerate(self.routers):
            router.register_forward_hook(self._make_hook(index))

    def _make_hook(self, index: int):
        def count(module, args, output):
            if not torch.is_grad_enabled():
                # Training forwards only, once each: with full recompute a layer's first pass runs without grad
                # and its recompute in the backward with it (Megatron's router adds its aux loss by the same rule).
                return
            _, routing_map = output
            if self.counts.device != routing_map.device:  # kept beside the model: no GPU->host sync per forward
                self.counts = self.counts.to(routing_map.device)
            self.counts[index] += routing_map.detach().sum(dim=0).to(torch.float64)

        return count

    def reset(self) -> None:
        self.counts.zero_()
        moe_utils.clear_aux_losses_tracker()

    def summary(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Imbalance (max/mean tokens per expert) of each MoE layer and of the worst one, the coefficient of
        variation, tokens routed to each expert of each layer (summed over the group; a list per layer, drawn by W&B
        as a histogram over the expert index), and the aux loss. The headline is the
        worst layer: summed over layers, one collapsed layer hides behind balanced ones."""
        if not self.routers:
            return {}
        counts = self.counts.clone()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        layer_mean = counts.mean(dim=1).clamp_min(1e-9)
        layer_imbalance = (counts.max(dim=1).values / layer_mean).tolist()
        layer_cv = (counts.std(dim=1, unbiased=False) / layer_mean).tolist()
        stats = {"moe_load_imbalance": max(layer_imbalance), "moe_load_cv": max(layer_cv)}
        stats.update({f"moe_load_imbalance/layer_{i}": value for i, value in enumerate(layer_imbalance)})
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if "load_balancing_loss" in tracker:
            values = tracker["load_balancing_loss"]["values"]
            moe_layers = values[values != 0]
            if moe_layers.numel():
                stats["moe_aux_loss"] = float(moe_layers.mean())
        for layer, tokens in enumerate(counts.tolist()):
            stats[f"{EXPERT_LOAD_PREFIX}layer_{layer}"] = tokens
        return stats
