"""Backbone optimizer, LR schedule, and global grad clipping.

The backbone steps with torch AdamW (nanoGPT-style decay groups, CPU and GPU) or, with ``optim.distributed``
on GPUs, Megatron-core's DistributedOptimizer; both sit behind one small interface (``grad_norm_sq``,
``step``, ``zero_grad`` and their sharded checkpoint state), so the train loop does not branch on it.

The Engram table has its own sparse optimizer inside ``engram_train.memory``; it shares this module's
schedule (times ``engram.lr_multiplier``) and the global gradient norm, so clipping treats the backbone
and the table as one model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engram_train.backbone.dcp_files import adam_sharded_state_dict, init_adam_state, load_adam_state_dict
from engram_train.config import OptimConfig
from engram_train.grad_sync import backbone_grad_norm_sq, grad_of


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Matrices decay; norms, gains, biases and conv kernels do not (as in nanoGPT)."""
    return param.dim() >= 2 and "conv" not in name


class TorchAdamW:
    """torch AdamW over the full (all-reduced) gradients: every DP rank keeps the moments of its TP/EP shard.

    Runs on CPU and GPU. The gradient norm counts every shard once (``grad_sync.backbone_grad_norm_sq``).
    With bf16 parameters (``model.precision=bf16``) AdamW steps fp32 main copies of them on their fp32
    gradients (``main_grad``) and the bf16 weights are rounded from those after every step, so updates
    smaller than bf16's resolution accumulate. Our own few lines: Megatron's equivalent
    (``Float16OptimizerWithFloat16Params``) accepts only ``torch.cuda`` tensors, so it cannot run on CPU.
    The main copies are saved in checkpoints beside the moments.
    """

    description = "torch AdamW (Adam state replicated on every DP rank)"
    #: Names the checkpoint format of the optimizer state (``Checkpointer`` refuses a mismatch).
    kind = "torch_adamw"
    #: The TP/EP layout a checkpoint of this state must be resumed at; None: any (moments are in model space).
    fixed_layout = None

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, dims):
        self.model, self.dims = model, dims
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (decay if decays(name, param) else no_decay).append(param)
        #: (model parameter, the tensor AdamW steps: the parameter itself, or its fp32 main copy) in optimizer order.
        self.pairs = [(p, p if p.dtype == torch.float32 else p.detach().float()) for p in decay + no_decay]
        mains = [main for _, main in self.pairs]
        groups = [
            {"params": mains[:len(decay)], "weight_decay": optim.weight_decay},
            {"params": mains[len(decay):], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                           foreach=True)

    def grad_norm_sq(self) -> torch.Tensor:
        return backbone_grad_norm_sq(self.model, self.dims)

    def step(self, *, lr: float, clip_scale: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for param, main in self.pairs:
            main.grad = grad_of(param)  # fp32 either way; a view, no copy
        if clip_scale < 1.0:
            for _, main in self.pairs:
                if main.grad is not None:
                    main.grad.mul_(clip_scale)
        self.optimizer.step()
        with torch.no_grad():
            for param, main in self.pairs:
                if main is not param:
                    param.copy_(main)
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for param, _ in self.pairs:
            param.grad = None

    def sharded_state_dict(self, model_state: dict, *, loading: bool) -> dict:
        return adam_sharded_state_dict(self.optimizer, model_state, loading=loading, model_params=[p for p, _ in self.pairs])

    def load_state_dict(self, state: dict) -> None:
        load_adam_state_dict(self.optimizer, state)


def megatron_optimizer_config(optim: OptimConfig, params_dtype: torch.dtype = torch.float32):
    """Our optim group as Megatron's ``OptimizerConfig`` (clipping off: the trainer clips). With bf16 parameters
    Megatron's optimizer keeps fp32 main parameters (its ``main_params_dtype`` default) and fp32 main grads."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.lr * optim.min_lr_ratio, weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1, adam_beta2=optim.beta2, adam_eps=optim.eps, clip_grad=0.0,
        use_distributed_optimizer=True, params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
    )


def megatron_decay_overrides() -> dict:
    """``decays`` as Megatron's per-parameter override (its default skips only biases and 1-D tensors)."""
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    no_decay = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="no_weight_decay", fn=lambda param, name: not decays(name, param)))
    return {no_decay: {"wd_mult": 0.0}}


# Each rank saves and loads its own slices, no communication; the TP/EP layout must stay (``fixed_layout``).
# In megatron-core 0.16.1 with torch's Adam (no Apex/TE) the layout-free formats fail: the default
# (fully_sharded_model_space) uses flattened ranges its dist_checkpointing rejects, and fully_reshardable
# fails to load torch Adam's per-parameter "step". Neither depends on the dtype; bf16 needs _index_params_as_stepped
# whichever format is used, since all of them find main parameters through the numbering it mends.
_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def _index_params_as_stepped(optimizer) -> None:
    """Number each model parameter as Megatron's inner Adam holds its main parameter (bf16 checkpoints).

    megatron-core 0.16.1 numbers a group's parameters in bucket order (``_build_optimizer_group_ranges``) but gives
    Adam the group's fp32 parameters first, then the fp32 main copies of its bf16 ones
    (``_build_model_and_main_param_groups``). Its checkpoint code (``_get_main_param_and_optimizer_states``, its
    setter, ``load_state_dict``) finds a parameter's main copy and moments by that number, so in a group holding
    both dtypes it takes another parameter's: the save stops at a shape assertion, or, where the shapes agree,
    writes the wrong state. Under bf16 our groups hold both: without TE, Megatron's norms (``WrappedTorchNorm``)
    keep fp32 weights (we do not wrap the model in ``Float16Module``, which would cast them). Steps are unaffected:
    they pair model and main parameters by list, not by this number.
    """
    if not hasattr(optimizer, "model_param_group_index_map"):  # not a DistributedOptimizer (e.g. an empty part)
        return
    optimizer.model_param_group_index_map = {
        param: (group_index, order)
        for group_index, (fp32, float16) in enumerate(zip(optimizer.model_fp32_groups, optimizer.model_float16_groups))
        for order, param in enumerate([*fp32, *float16])
    }


class MegatronDistributedAdam:
    """Megatron-core's DistributedOptimizer (``optim.distributed``, GPU only): ZeRO-1 over the DP ranks.

    Megatron DDP reduce-scatters the gradients, so each rank steps Adam on its slice of every bucket and
    the updated parameters are all-gathered. Megatron keeps one optimizer for dense and one for expert
    parameters (their DP groups differ) and computes the norm over the slices, each counted once. Clipping
    stays ours: that norm joins the table's, and one scale is applied to both.
    """

    description = "Megatron DistributedOptimizer (Adam state sharded over DP ranks)"
    kind = "megatron_distributed"

    def __init__(self, model: torch.nn.Module, grad_sync, optim: OptimConfig):
        from megatron.core import parallel_state
        from megatron.core.optimizer import get_megatron_optimizer

        # Its flat buffers follow the parameter order, which grouped and sequential experts order differently.
        self.fixed_layout = {"tp": parallel_state.get_tensor_model_parallel_world_size(),
                             "ep": parallel_state.get_expert_model_parallel_world_size(),
                             "experts": model.kernels.experts}

        config = megatron_optimizer_config(optim, model.config.params_dtype)
        self.optimizer = get_megatron_optimizer(config, [grad_sync.ddp], config_overrides=megatron_decay_overrides(),
                                                use_gloo_process_groups=False)
        self.parts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for part in self.parts:
            _index_params_as_stepped(part)
        # Megatron's own LR scheduler sets weight_decay from wd_mult; we set it once here.
        for group in self.optimizer.param_groups:
            group["weight_decay"] = optim.weight_decay * group["wd_mult"]

    def grad_norm_sq(self) -> torch.Tensor:
        self.optimizer.prepare_grads()  # this rank's slice of the reduced buffers -> the fp32 main grads
        return torch.tensor(float(self.optimizer.get_grad_norm()) ** 2, dtype=torch.float64)

    def step(self, *, lr: float, clip_scale: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if clip_scale < 1.0:
            for part in self.parts:
                for param in part.get_parameters():
                    if param.grad is not None:
                        param.grad.mul_(clip_scale)
        self.optimizer.step_with_ready_grads()  # Adam on the slices, then the parameter all-gather
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def sharded_state_dict(self, model_state: dict, *, loading: bool) -> dict:
        if loading:
            # A fresh torch Adam has no state, and Megatron (without Apex/TE) reads the step count from it.
            for part in self.parts:
                if isinstance(part.optimizer, (torch.optim.Adam, torch.optim.AdamW)):  # not TE's FusedAdam
                    init_adam_state(part.optimizer)
        return self.optimizer.sharded_state_dict(model_state, is_loading=loading, metadata=_SHARDING)

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
            self.optimizer.load_state_dict(state)
        # Without Apex/TE, Megatron keeps torch Adam's step count in the param groups of the checkpoint, but
        # its per-slice state load then writes back the step of the blank state it loaded into (0), and where
        # it does set the step it shares one tensor between all parameters (torch increments each in place).
        # Either breaks Adam's bias correction after a resume: give every parameter its group's step.
        for part in self.parts:
            if part.optimizer is None:
                continue
            for group in part.optimizer.param_groups:
                for param in group["params"]:
                    param_state = part.optimizer.state.get(param)
                    if param_state and "step" in param_state and "step" in group:
                        # A new tensor per parameter, where Adam keeps it (CPU, or the parameter's device for a
                        # fused/capturable Adam)
                        param_state["step"] = torch.full_like(param_state["step"], float(group["step"]))


def configure_optimizer(model: torch.nn.Module, grad_sync, optim: OptimConfig, dims) -> TorchAdamW | MegatronDistributedAdam:
    """The backbone optimizer (``optim.distributed`` picks Megatron's, which steps on ``grad_sync``'s reduce-scattered
    buffers; ``build_model`` checked it has a GPU)."""
    return MegatronDistributedAdam(model, grad_sync, optim) if optim.distributed else TorchAdamW(model, optim, dims)


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
        warmup_tokens = optim.warmup_fraction * total_steps * tokens_per_step if optim.warmup_fraction else optim.warmup_tokens
        warmup = min(total_steps, math.ceil(warmup_tokens / tokens_per_step))
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

    ``backbone_norm_sq`` is already global (grad_sync.backbone_grad_norm_sq); the table's is over the
    rows this rank owns and is summed over the table group here.
    """
    backbone = backbone_norm_sq.detach().to("cpu", torch.float64)  # from the GPU when the backbone is there
    table = torch.tensor(float(table_norm_sq), dtype=torch.float64)
    if table_group is not None and dist.get_world_size(table_group) > 1:
        dist.all_reduce(table, group=table_group)
    return float((backbone + table).sqrt())


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """Scale to apply to every gradient (1.0 when clipping is off or not needed)."""
    if max_norm <= 0 or not math.isfinite(grad_norm):
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))
