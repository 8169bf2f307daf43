"""Run megatron-core 0.16.1's GPTModel + MoE on a CPU-only torch.

Megatron assumes CUDA in a handful of places (facts measured in shared/notes/megatron_on_cpu.md).
``apply_cpu_compat`` redirects exactly those to the CPU and is called only when no GPU is
present, so the GPU path runs Megatron as is (``kernels.bind_router_gemm_without_te``, needed on
every device, is not a CPU redirection). Every redirection is listed here and nowhere else.
"""

from __future__ import annotations

import torch

_applied = False


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_dtoh_and_synchronize(self, point: str, tokens_per_expert: torch.Tensor | None = None):
    """CPU twin of MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize: no streams, no events.

    The all-to-all needs its split sizes as host values; on CPU they only change type.
    """
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name, None)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def _gloo_uneven_collectives(mappings) -> None:
    """Gloo cannot all-gather or reduce-scatter uneven splits, which MoE with TP x EP uses.

    Uneven all-gather: pad every piece to the largest, gather, trim. Uneven reduce-scatter: all-reduce
    the whole tensor and keep this rank's split (same sum, more traffic; only small CPU runs take it).
    """
    import torch.distributed as dist

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:size] for piece, size in zip(pieces, output_split_sizes)], dim=0)

    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        rank = dist.get_rank(group)
        start = sum(input_split_sizes[:rank])
        return total[start : start + input_split_sizes[rank]].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven


def apply_cpu_compat() -> None:
    """Redirect Megatron's CUDA-only calls to the CPU. Idempotent; refuses to run with a GPU."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_compat() is for CPU-only runs; a GPU is present, use Megatron as is")

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.mappings as mappings
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.utils as transformer_utils
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    # 1. ~40 call sites ask for torch.cuda.current_device() to place tensors.
    torch.cuda.current_device = lambda: torch.device("cpu")

    # 2. The model-parallel RNG tracker saves and restores CUDA generator state; use the CPU generator.
    # torch.cuda.manual_seed must not become torch.manual_seed (which calls back into torch.cuda).
    tp_random._get_cuda_rng_state = _cpu_get_rng_state
    tp_random._set_cuda_rng_state = _cpu_set_rng_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))

    # 3. The default causal mask is allocated on "cuda" (and imported by name into fused_softmax).
    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    # 4. The alltoall dispatcher makes a CUDA stream in __init__ and syncs with CUDA events.
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "cpu: no streams"
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _cpu_dtoh_and_synchronize

    # 5. Gloo lacks uneven all-gather / reduce-scatter (MoE token exchange with TP x EP).
    _gloo_uneven_collectives(mappings)

    # 6. Megatron's distributed checkpoint writer synchronises the CUDA stream before reading tensors.
    torch.cuda.synchronize = lambda device=None: None

    _applied = True
