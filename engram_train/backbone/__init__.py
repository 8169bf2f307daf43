"""Megatron-core backbone: GPTModel with MoE layers and Engram blocks at chosen layers."""

from __future__ import annotations

import warnings

import torch

# Megatron warns at import that Transformer Engine and Apex are absent; without a GPU that is expected. On a GPU
# the same warnings say that fast kernels are missing, so they are kept there.
if not torch.cuda.is_available():
    warnings.filterwarnings("ignore", module=r"megatron\..*")

from engram_train.backbone.kernels import bind_router_gemm_without_te
from engram_train.backbone.model import EngramLayout, EngramMoEModel
from engram_train.config import ConfigError
from engram_train.grad_sync import GradSync, build_grad_sync


def build_model(cfg, *, vocab_size: int, dims) -> tuple[EngramMoEModel, GradSync]:
    """The backbone for this rank's TP/EP shard and the strategy that makes its gradients global
    (``parallel.grad_sync``): the one place a rank's model is parallelised. CPU compatibility is applied only
    without a GPU."""
    on_cpu = not torch.cuda.is_available()
    if on_cpu and cfg.optim.distributed:
        raise ConfigError(
            "optim.distributed=true needs a GPU: Megatron-core's DistributedOptimizer allocates its state on CUDA "
            "and none is available here. Set optim.distributed=false (torch AdamW, the CPU default)."
        )
    if on_cpu:
        from engram_train.backbone.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
    bind_router_gemm_without_te()  # on every device: Megatron without TE needs it on a GPU too
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(cfg.experiment.seed)
    multiple = cfg.model.make_vocab_size_divisible_by * dims.tp
    padded_vocab = -(-vocab_size // multiple) * multiple
    model = EngramMoEModel(
        cfg.model,
        EngramLayout.from_config(cfg.engram),
        vocab_size=padded_vocab,
        seq_len=cfg.data.seq_len,
        gate_signed_sqrt=cfg.engram.gate_signed_sqrt,
        projection_bias=cfg.engram.projection_bias,
        conv_kernel_size=cfg.engram.conv_kernel_size,
        tp=dims.tp,
        ep=dims.ep,
        on_cpu=on_cpu,
        init_seed=cfg.experiment.seed,
    )
    if not on_cpu:
        model = model.cuda()
    return model, build_grad_sync(cfg.parallel.grad_sync, model, dims, distributed_optimizer=cfg.optim.distributed)


__all__ = ["EngramLayout", "EngramMoEModel", "build_model"]
