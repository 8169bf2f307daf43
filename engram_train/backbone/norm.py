"""Megatron's local torch norm under sequence parallelism.

Megatron requires sequence parallelism for MoE with TP > 1, but its torch norm (used without
Transformer Engine) refuses ``sequence_parallel=True``. A norm is per token, so it computes the same
thing either way; what SP changes is that each TP rank sees only its slice of the sequence, so the
norm's gradient is partial and must be summed over the TP group. We build the norm with SP off and tag
its parameters ``sequence_parallel`` so ``grad_sync.finalize_grads`` sums them, as Megatron's
``finalize_model_grads`` does for Transformer Engine norms.
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.torch_norm import WrappedTorchNorm


class SequenceParallelTorchNorm:
    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        norm = WrappedTorchNorm(dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

