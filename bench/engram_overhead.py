"""Step time of Engram-MoE vs the MoE baseline at equal activated parameters, measured side by side.

Both models are the tiny preset's backbone; the baseline gets a shared expert sized so that its
activated parameters equal Engram-MoE's (the Engram blocks' projections are activated compute, the
table is not). Single optimizer steps of the models alternate round-robin in one process and the
ratio is of per-step medians, so bursts of machine noise hit every model alike and drop out. Engram runs with the table prefetched (engram.prefetch=overlap) and, for reference,
without. Prints the ratios and writes bench/results/engram_overhead.json.

    python bench/engram_overhead.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from engram_train.backbone import build_model
from engram_train.config import Config, validate
from engram_train.engram import NgramHasher
from engram_train.memory import ShardedEngramTable, TablePrefetcher, UniqueIds
from engram_train.optim import clip_coefficient, configure_optimizer, global_grad_norm
from engram_train.parallel import ParallelDims, destroy_process_groups, init_process_groups
from engram_train.throughput import activated_parameters
from engram_train.train_step import StepPlan, apply_update, train_step

VOCAB = 8192
RESULTS = Path(__file__).resolve().parent / "results" / "engram_overhead.json"


def tiny_config(engram: bool, shared_expert: int = 0) -> Config:
    cfg = Config()
    cfg.engram.enabled = engram
    cfg.model.moe_shared_expert_intermediate_size = shared_expert
    cfg.experiment.micro_batch_size = 16
    cfg.experiment.batch_tokens = 4096
    cfg.experiment.total_tokens = 10**9
    validate(cfg)
    return cfg


def matched_shared_expert(engram_cfg: Config) -> int:
    """Shared-expert width that gives the baseline Engram-MoE's activated parameter count."""
    target = activated_parameters(engram_cfg, VOCAB)
    base = activated_parameters(tiny_config(False), VOCAB)
    per_unit = 3 * engram_cfg.model.hidden_size * engram_cfg.model.num_layers
    return max(1, round((target - base) / per_unit))


class Runner:
    def __init__(self, cfg: Config, dims: ParallelDims, groups, hasher: NgramHasher | None, prefetch: bool):
        self.cfg, self.dims, self.hasher = cfg, dims, hasher
        self.model, self.grad_sync = build_model(cfg, vocab_size=VOCAB, dims=dims)
        self.optimizer = configure_optimizer(self.model, self.grad_sync, cfg.optim, dims)
        self.groups = groups
        self.table = None
        if hasher is not None:
            self.table = ShardedEngramTable(hasher.num_rows, cfg.engram.head_dim, group=groups.table,
                                            lr=cfg.optim.lr * 5, seed=0, use_cpu_adam=True)
        self.prefetcher = self.make_prefetcher() if prefetch and self.table is not None else None
        self.plan = StepPlan.from_config(cfg, data_parallel_world=1)
        self.generator = np.random.default_rng(0)

    def make_prefetcher(self) -> TablePrefetcher:
        """As the trainer builds it (on a GPU the thread also starts the row copies)."""
        return TablePrefetcher.for_device(self.table, next(self.model.parameters()).device)

    def batches(self):
        while True:
            tokens = self.generator.integers(0, VOCAB, (self.cfg.experiment.micro_batch_size, self.cfg.data.seq_len + 1))
            hashes = torch.from_numpy(self.hasher.hash_numpy(tokens[:, :-1])) if self.hasher is not None else None
            unique = UniqueIds.of(hashes) if hashes is not None else None  # as the loader's workers do
            yield {"tokens": torch.from_numpy(tokens), "hash_ids": hashes, "hash_unique": unique}

    def time_steps(self, steps: int) -> list[float]:
        """Seconds of each of ``steps`` optimizer steps (batches are made beforehand: in training,
        hashing and batching run in loader workers)."""
        source = iter([next(self.batches()) for _ in range(steps * self.plan.accumulation)])
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            # the trainer's step: forward/backward, the global grad norm (which also readies a distributed
            # optimizer's gradients), the update; on a GPU the clock stops once the update has run there too
            result = train_step(self.model, self.grad_sync, self.table, self.prefetcher, source, self.plan, self.dims)
            norm = global_grad_norm(self.optimizer.grad_norm_sq(), result.table_grad_norm_sq,
                                    table_group=self.groups.table)
            apply_update(self.optimizer, self.table, lr=1e-3, table_lr=5e-3, clip_scale=clip_coefficient(norm, 1.0),
                         dims=self.dims)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per model")
    args = parser.parse_args()

    engram_cfg = tiny_config(True)
    shared = matched_shared_expert(engram_cfg)
    baseline_cfg = tiny_config(False, shared_expert=shared)
    dims = ParallelDims.from_config(engram_cfg)
    groups = init_process_groups(dims)
    try:
        torch.manual_seed(0)
        hasher = NgramHasher.from_config(engram_cfg.engram, np.arange(VOCAB, dtype=np.int64), pad_token_id=0)
        runners = {
            "moe_baseline": Runner(baseline_cfg, dims, groups, None, prefetch=False),
            "engram_prefetch": Runner(engram_cfg, dims, groups, hasher, prefetch=True),
            "engram_no_prefetch": Runner(engram_cfg, dims, groups, hasher, prefetch=False),
        }
        for runner in runners.values():
            runner.time_steps(2)  # warm-up: allocator, DeepSpeed kernel load, first-touch table state
        times = {name: [] for name in runners}
        for _ in range(args.steps):
            for name, runner in runners.items():
                times[name] += runner.time_steps(1)
        median = {name: statistics.median(values) for name, values in times.items()}
        result = {
            "activated_params": {
                "engram_moe": activated_parameters(engram_cfg, VOCAB),
                "moe_baseline": activated_parameters(baseline_cfg, VOCAB),
                "baseline_shared_expert_width": shared,
            },
            "engram_table_rows": hasher.num_rows,
            "tokens_per_step": runners["moe_baseline"].plan.tokens_per_step,
            "step_s": median,
            "step_s_all": times,
            "ratio_engram_prefetch_vs_baseline": median["engram_prefetch"] / median["moe_baseline"],
            "ratio_engram_no_prefetch_vs_baseline": median["engram_no_prefetch"] / median["moe_baseline"],
            "goal": "ratio with prefetch <= 1.05",
            "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        }
        for runner in runners.values():
            if runner.prefetcher is not None:
                runner.prefetcher.close()
    finally:
        destroy_process_groups()
    print(f"activated params: Engram-MoE {result['activated_params']['engram_moe']:,}, "
          f"MoE baseline {result['activated_params']['moe_baseline']:,} (shared expert width {shared})")
    for name, seconds in median.items():
        print(f"  {name:<20} {seconds * 1000:8.1f} ms/step  ({result['tokens_per_step'] / seconds:,.0f} tokens/s)")
    print(f"Engram-MoE (prefetch) / MoE baseline step time: {result['ratio_engram_prefetch_vs_baseline']:.3f}x (goal <= 1.05x)")
    print(f"Engram-MoE (no prefetch) / MoE baseline:        {result['ratio_engram_no_prefetch_vs_baseline']:.3f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
