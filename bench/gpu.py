"""GPU step time, MFU and the Engram-MoE / MoE step-time ratio at equal activated parameters, side by side.

The paper's systems claim (DESIGN.md section 5): a 100B-row table in host memory costs < 3% step time when its rows
are prefetched. Here a GPU-sized backbone (bf16 on a GPU) trains with an Engram table of ``--rows`` rows in host
RAM (bf16 rows, row-wise Adagrad: 72 bytes per row at dim 32) against the same backbone without Engram whose
shared expert is widened to the same activated parameters. Steps of the models alternate round-robin in one
process, so machine noise hits both alike; the ratio is of per-step medians. MFU is model FLOPs
(6 x activated parameters + attention) over ``--peak-tflops``. Writes bench/results/gpu.json.

    python bench/gpu.py --peak-tflops 989      # H100 SXM dense bf16; H200 the same
Without a GPU it runs a small CPU configuration (the script's own check; its figures are not GPU figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from engram_overhead import Runner  # the timed train_step + apply_update of one model

from engram_train.config import Config, validate
from engram_train.engram import NgramHasher
from engram_train.memory import ShardedEngramTable
from engram_train.parallel import ParallelDims, destroy_process_groups, init_process_groups
from engram_train.throughput import activated_parameters, flops_per_token

VOCAB = 32768
RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
#: (layers, hidden, heads, experts, top-k, expert width, seq, micro-batch) on a GPU and for the CPU check
SHAPES = {"gpu": (12, 1024, 16, 16, 2, 1024, 2048, 8), "cpu": (2, 64, 4, 4, 2, 64, 128, 4)}
#: Micro-batches per step. Prefetching overlaps a micro-batch's lookup with the backward of the one before it; the first lookup of
#: a step waits for the previous step's table update, so with one micro-batch per step every lookup would sit on
#: the critical path, which is not how pretraining runs (accumulation > 1 at these sizes).
ACCUMULATION = 2


def config(shape: str, *, engram: bool, rows: int, shared_expert: int = 0, expert_kernels: str = "auto") -> Config:
    """``expert_kernels``: model.experts (the side-by-side sequential baseline sets it)."""
    layers, hidden, heads, experts, topk, width, seq, micro = SHAPES[shape]
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = layers, hidden, heads
    m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size = experts, topk, width
    m.moe_shared_expert_intermediate_size = shared_expert
    m.experts = expert_kernels
    cfg.data.seq_len = seq
    cfg.engram.enabled = engram
    cfg.engram.layers = [1, layers // 2] if layers >= 4 else [1]
    cfg.engram.head_dim = 32
    cfg.engram.table_dtype, cfg.engram.optimizer = "bfloat16", "rowwise_adagrad"
    heads_total = len(cfg.engram.layers) * len(cfg.engram.ngram_orders) * cfg.engram.heads_per_order
    cfg.engram.rows_per_head = max(2, rows // heads_total)
    cfg.experiment.micro_batch_size = micro
    cfg.experiment.batch_tokens = seq * micro * ACCUMULATION
    cfg.experiment.total_tokens = 10**12
    validate(cfg)
    return cfg


def matched_shared_expert(engram_cfg: Config, shape: str, rows: int) -> int:
    """The baseline's shared-expert width that gives it Engram-MoE's activated parameters."""
    gap = activated_parameters(engram_cfg, VOCAB) - activated_parameters(config(shape, engram=False, rows=rows), VOCAB)
    return max(1, round(gap / (3 * engram_cfg.model.hidden_size * engram_cfg.model.num_layers)))


class TableRunner(Runner):
    """engram_overhead's runner with the table's dtype and optimizer from the config (a large table needs both)."""

    def __init__(self, cfg: Config, dims: ParallelDims, groups, hasher: NgramHasher | None, prefetch: bool):
        super().__init__(cfg, dims, groups, None, prefetch=False)
        self.hasher = hasher
        if hasher is not None:
            e = cfg.engram
            self.table = ShardedEngramTable(hasher.num_rows, e.head_dim, group=groups.table, optimizer=e.optimizer,
                                            table_dtype=e.table_dtype, lr=cfg.optim.lr * 5, seed=0)
            self.prefetcher = self.make_prefetcher() if prefetch else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per model")
    parser.add_argument("--rows", type=int, default=None, help="Engram table rows (GPU default 200M, CPU 100k)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100/H200: 989)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the JSON result (default {RESULTS})")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    shape = "gpu" if on_gpu else "cpu"
    rows = args.rows or (200_000_000 if on_gpu else 100_000)
    steps = args.steps if on_gpu else min(args.steps, 5)

    engram_cfg = config(shape, engram=True, rows=rows)
    baseline_cfg = config(shape, engram=False, rows=rows, shared_expert=matched_shared_expert(engram_cfg, shape, rows))
    dims = ParallelDims.from_config(engram_cfg)
    groups = init_process_groups(dims)
    try:
        torch.manual_seed(0)
        hasher = NgramHasher.from_config(engram_cfg.engram, np.arange(VOCAB, dtype=np.int64), pad_token_id=0)
        runners = {"moe_baseline": TableRunner(baseline_cfg, dims, groups, None, prefetch=False),
                   "engram_prefetch": TableRunner(engram_cfg, dims, groups, hasher, prefetch=True)}
        if runners["moe_baseline"].model.kernels.grouped_gemm:
            # the same baseline with its experts one after another: what the grouped expert GEMM buys
            width = baseline_cfg.model.moe_shared_expert_intermediate_size
            sequential = config(shape, engram=False, rows=rows, shared_expert=width, expert_kernels="sequential")
            runners["moe_sequential_experts"] = TableRunner(sequential, dims, groups, None, prefetch=False)
        kernels = runners["engram_prefetch"].model.kernels.describe()
        for runner in runners.values():
            runner.time_steps(2)  # warm-up: CUDA context, allocator, first-touch table pages
        times = {name: [] for name in runners}
        for _ in range(steps):
            for name, runner in runners.items():
                if on_gpu:
                    torch.cuda.synchronize()
                times[name] += runner.time_steps(1)
        for runner in runners.values():
            if runner.prefetcher is not None:
                runner.prefetcher.close()
    finally:
        destroy_process_groups()
    median = {name: statistics.median(values) for name, values in times.items()}
    tokens = runners["moe_baseline"].plan.tokens_per_step
    fpt = {"moe_baseline": flops_per_token(baseline_cfg, VOCAB), "engram_prefetch": flops_per_token(engram_cfg, VOCAB)}
    fpt["moe_sequential_experts"] = fpt["moe_baseline"]
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads; not a GPU figure)",
        "kernels": kernels,
        "shape": dict(zip(("layers", "hidden", "heads", "experts", "topk", "expert_width", "seq", "micro_batch"),
                          SHAPES[shape])),
        "engram_table_rows": hasher.num_rows,
        "activated_params": {"engram_moe": activated_parameters(engram_cfg, VOCAB),
                             "moe_baseline": activated_parameters(baseline_cfg, VOCAB)},
        "tokens_per_step": tokens,
        "micro_batches_per_step": ACCUMULATION,
        "step_s": median,
        "step_s_all": times,
        "tokens_per_s": {name: tokens / s for name, s in median.items()},
        "mfu": {name: tokens / s * fpt[name] / 1e12 / args.peak_tflops for name, s in median.items()} if on_gpu else None,
        "ratio_engram_vs_baseline": median["engram_prefetch"] / median["moe_baseline"],
        "ratio_grouped_vs_sequential_experts": (median["moe_baseline"] / median["moe_sequential_experts"]
                                                if "moe_sequential_experts" in median else None),
        "goal": "ratio <= 1.03 (the paper: < 3% for a 100B-row table in host memory)",
    }
    print(f"{result['device']}: {kernels}")
    print(f"activated params: Engram-MoE {result['activated_params']['engram_moe']:,}, "
          f"MoE {result['activated_params']['moe_baseline']:,}; table {hasher.num_rows:,} rows in host RAM")
    for name, seconds in median.items():
        mfu = f", MFU {result['mfu'][name]:.1%}" if result["mfu"] else ""
        print(f"  {name:<22} {seconds * 1000:8.1f} ms/step  ({tokens / seconds:,.0f} tokens/s{mfu})")
    print(f"Engram-MoE / MoE step time: {result['ratio_engram_vs_baseline']:.3f}x (goal <= 1.03x)")
    if result["ratio_grouped_vs_sequential_experts"] is not None:
        print(f"MoE step time, grouped / sequential experts: {result['ratio_grouped_vs_sequential_experts']:.3f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
