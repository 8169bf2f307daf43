"""Compute accounting: model FLOPs per token, achieved TFLOP/s and MFU, per-rank memory, and the machine.

FLOPs follow the PaLM/nanoGPT convention (6 x activated matmul parameters per token for forward +
backward, plus the attention score and value products); MoE layers count only the experts a token
is routed to. The Engram table lookup is memory traffic, not FLOPs, so only the Engram blocks' dense
projections are counted.
"""

from __future__ import annotations

import platform
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from engram_train.config import Config
from engram_train.parallel import collective_device


def activated_parameters(cfg: Config, vocab_size: int) -> int:
    """Matmul parameters one token passes through (embedding lookups excluded)."""
    m, e = cfg.model, cfg.engram
    hidden = m.hidden_size
    attention = 4 * hidden * hidden
    if m.num_experts:
        mlp = m.moe_router_topk * 3 * hidden * m.moe_ffn_hidden_size + hidden * m.num_experts
        mlp += 3 * hidden * m.moe_shared_expert_intermediate_size
    else:
        mlp = 3 * hidden * m.ffn_hidden_size
    engram = 0
    if e.enabled:
        memory_dim = len(e.ngram_orders) * e.heads_per_order * e.head_dim
        engram = len(e.layers) * (2 * memory_dim * hidden + e.conv_kernel_size * hidden)
    return m.num_layers * (attention + mlp) + engram + hidden * vocab_size


def flops_per_token(cfg: Config, vocab_size: int) -> float:
    attention_scores = 12 * cfg.model.num_layers * cfg.model.hidden_size * cfg.data.seq_len
    return 6 * activated_parameters(cfg, vocab_size) + attention_scores


def throughput_metrics(tokens_per_s: float, *, flops_per_token: float, world: int, peak_tflops: float) -> dict:
    """``tokens_per_s`` is the whole job's; TFLOP/s and MFU are per rank."""
    tflops = tokens_per_s * flops_per_token / world / 1e12
    metrics = {"model_tflops_per_rank": tflops}
    if peak_tflops > 0:
        metrics["mfu"] = tflops / peak_tflops
    return metrics


def memory_metrics() -> dict:
    """Peak host RSS (and GPU memory when present) of every rank: max and per rank, from rank 0's view."""
    values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]  # KiB -> MiB on Linux
    if torch.cuda.is_available():
        values.append(torch.cuda.max_memory_allocated() / 2**20)
    local = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        local = local.to(collective_device())
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
    else:
        gathered = [local]
    metrics = {"memory/host_peak_mib_max": max(float(g[0]) for g in gathered)}
    for rank, values in enumerate(gathered):
        metrics[f"memory/host_peak_mib/rank_{rank}"] = float(values[0])
        if len(values) > 1:
            metrics[f"memory/gpu_peak_mib/rank_{rank}"] = float(values[1])
    return metrics


def machine() -> dict:
    """What rank 0 trained on, for a run's ``result.json``.

    Tokens/s means nothing without it, and at sweep scales the losses themselves differ across CPU vendors
    (the same AVX2 kernels on an Intel and an AMD machine ended 0.028 nats apart: README, Reproducibility).
    """
    cpu = ""
    try:  # the marketing name; platform.processor() gives only "x86_64" on Linux
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
