"""How backbone gradients become those of the global batch (``parallel.grad_sync``).

Two strategies behind one small interface (``start`` before the first micro-batch, ``no_sync`` around
every micro-batch but the last, ``finish`` after the last backward), giving the same gradients:

- ``CoalescedGradSync``: after the backward, one flat all-reduce per group (``finalize_grads``).
  On CPU, where the all-reduce cannot overlap anything (every core computes), this is the cheapest. With bf16
  parameters it accumulates each gradient into an fp32 ``main_grad`` as soon as autograd has it, as Megatron's
  DDP does, so micro-batches are summed and reduced in fp32 (``grad_reduce_in_fp32``).
- ``MegatronGradSync``: Megatron-core's ``DistributedDataParallel``. Gradients accumulate in fp32 bucket
  buffers (``param.main_grad``) and each bucket's all-reduce starts during the last micro-batch's backward
  as soon as its gradients are ready (``overlap_grad_reduce``), hidden behind the remaining backward on a
  GPU. It runs the same way on CPU with gloo, which is how CI tests the GPU default's logic.

``build_model`` returns the strategy beside the model, the one place where a rank's model is parallelised (its
TP/EP shard, then its gradient sync); ``train_step`` and the distributed optimizer take it from there. This
module holds every rule for reducing backbone gradients
(which group, which scale, sequence-parallel partial sums) and for their global norm; ``parallel`` only
makes the process groups.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from engram_train.parallel import ParallelDims


def _accumulate_in_fp32(param: torch.nn.Parameter) -> None:
    param.main_grad.add_(param.grad)
    param.grad = None  # the bf16 gradient is folded in: free it now, as Megatron DDP's hook does


class CoalescedGradSync:
    description = "one coalesced all-reduce per group after the backward"

    def __init__(self, model: torch.nn.Module, dims: ParallelDims):
        self.model, self.dims = model, dims
        params = [p for p in model.parameters() if p.requires_grad]
        self.main_grads, self.hooks = None, []
        if any(p.dtype != torch.float32 for p in params):
            # One flat fp32 buffer, each parameter's main_grad a view of it (zeroed in one call per step).
            self.main_grads = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
            offset = 0
            for param in params:
                param.main_grad = self.main_grads[offset:offset + param.numel()].view_as(param)
                offset += param.numel()
                self.hooks.append(param.register_post_accumulate_grad_hook(_accumulate_in_fp32))
            self.description += " (fp32 gradient accumulation and reduction)"

    def close(self) -> None:
        """Stop accumulating into ``main_grad`` (another grad sync takes over the model)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def start(self) -> None:
        if self.main_grads is not None:
            self.main_grads.zero_()

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def finish(self) -> None:
        finalize_grads(self.model, self.dims)


class MegatronGradSync:
    """Megatron's DDP held beside the model, not around it: checkpoints, hooks and attribute access see the
    same module whichever strategy runs. After ``finish`` every ``param.grad`` is its reduced ``main_grad``
    (a view into the bucket buffer), so the torch optimizer, clipping and the grad norm read them as usual;
    for the distributed optimizer the buckets are reduce-scattered and it reads its slices itself."""

    def __init__(self, model: torch.nn.Module, *, distributed_optimizer: bool = False):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=distributed_optimizer
        )
        self.ddp = DistributedDataParallel(model.config, ddp_config, module=model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.distributed_optimizer = distributed_optimizer
        reduce = "reduce-scatters (for the distributed optimizer)" if distributed_optimizer else "all-reduces"
        self.description = f"Megatron DistributedDataParallel, fp32 bucket {reduce} overlapped with the backward"

    def start(self) -> None:
        # The last step's grads are views into the buffer: drop them before it is zeroed, or autograd
        # would accumulate into the buffer on top of DDP's own accumulation.
        for param in self.params:
            param.grad = None
        self.ddp.zero_grad_buffer()

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync()

    def finish(self) -> None:
        # DP all-reduce of the buckets, then the TP sum of sequence-parallel (partial) gradients.
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp])
        if self.distributed_optimizer:
            return  # each rank holds only its shard of the reduced buffer; the optimizer reads it there
        for param in self.params:
            if param.dtype == param.main_grad.dtype:  # a bf16 parameter keeps its fp32 main_grad apart
                param.grad = param.main_grad


GradSync = CoalescedGradSync | MegatronGradSync


def build_grad_sync(choice: str, model: torch.nn.Module, dims: ParallelDims, *,
                    distributed_optimizer: bool = False) -> GradSync:
    """``choice`` is ``parallel.grad_sync`` (validated with the config). ``auto`` is Megatron's DDP on GPU
    (overlap pays there) and the coalesced all-reduce on CPU, where the backward already uses every core
    and an overlapped all-reduce only competes with it. ``distributed_optimizer`` (``optim.distributed``)
    makes DDP reduce-scatter instead of all-reduce."""
    if distributed_optimizer:
        return MegatronGradSync(model, distributed_optimizer=True)
    if choice == "megatron_ddp" or (choice == "auto" and next(model.parameters()).is_cuda):
        return MegatronGradSync(model)
    return CoalescedGradSync(model, dims)


def _all_reduce_coalesced(tensors: list[torch.Tensor], group, *, scale: float = 1.0) -> None:
    """One all-reduce for many small gradients (hundreds of separate gloo calls would dominate a step)."""
    if not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for tensor, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(reduced)


def _is_expert(param: torch.nn.Parameter) -> bool:
    """Megatron marks expert weights ``allreduce=False``: they sync over the expert-data-parallel group."""
    return not getattr(param, "allreduce", True)


def grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer steps on: the fp32 ``main_grad`` where a grad sync keeps one (Megatron DDP;
    bf16 parameters, whose gradients accumulate and are reduced in fp32), else ``param.grad``."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


def finalize_grads(model: torch.nn.Module, dims: ParallelDims) -> None:
    """Make every rank's gradients those of the global batch, as Megatron's finalize_model_grads does.

    1. Parameters applied to a sequence slice under SP (norms, router, Engram blocks) hold partial
       gradients: sum them over the TP group.
    2. Average dense gradients over the data-parallel group; sum expert gradients over the
       expert-data-parallel group (the ranks holding a replica of the same experts) and divide by DP.
    """
    from megatron.core import parallel_state

    grads = [(p, g) for p in model.parameters() if (g := grad_of(p)) is not None]
    if dims.tp > 1:
        partial = [g for p, g in grads if getattr(p, "sequence_parallel", False)]
        _all_reduce_coalesced(partial, parallel_state.get_tensor_model_parallel_group())
    dense = [g for p, g in grads if not _is_expert(p)]
    expert = [g for p, g in grads if _is_expert(p)]
    dp_size = parallel_state.get_data_parallel_world_size()
    if dp_size == 1:
        return
    _all_reduce_coalesced(dense, parallel_state.get_data_parallel_group(), scale=1.0 / dp_size)
    # An expert already saw the tokens of every DP rank in its EP group (the dispatcher's all-to-all),
    # each weighted by its own rank's mean: sum over replicas of the expert, then divide by the full
    # DP size, as Megatron's DDP does (expert_gradient_scaling_factor).
    if parallel_state.get_expert_data_parallel_world_size() > 1:
        _all_reduce_coalesced(expert, parallel_state.get_expert_data_parallel_group(), scale=1.0 / dp_size)
    else:
        for grad in expert:
            grad.mul_(1.0 / dp_size)


def backbone_grad_norm_sq(model: torch.nn.Module, dims: ParallelDims) -> torch.Tensor:
    """Sum of squared gradients of the whole backbone, each shard counted once (call after finalize_grads).

    TP-replicated parameters are counted on TP rank 0 only; dense sums are reduced over the TP group,
    expert sums over the expert tensor-and-model-parallel group.
    """
    from megatron.core import parallel_state

    device = next(model.parameters()).device  # NCCL reduces CUDA tensors only
    dense = torch.zeros((), dtype=torch.float64, device=device)
    expert = torch.zeros((), dtype=torch.float64, device=device)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    for param in model.parameters():
        grad = grad_of(param)
        if grad is None:
            continue
        sharded = getattr(param, "tensor_model_parallel", False)
        square = grad.detach().double().pow(2).sum()
        if _is_expert(param):
            if sharded or etp_rank == 0:
                expert += square
        elif sharded or tp_rank == 0:
            dense += square
    if dims.tp > 1:
        dist.all_reduce(dense, group=parallel_state.get_tensor_model_parallel_group())
    if dims.world > 1:
        dist.all_reduce(expert, group=parallel_state.get_expert_tensor_and_model_parallel_group())
    return dense + expert
