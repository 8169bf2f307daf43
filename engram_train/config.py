"""Typed schema for every Hydra config group, registered in Hydra's ConfigStore.

Hydra merges the YAML presets in ``conf/`` onto these dataclasses, so an unknown key or a value of the
wrong type is rejected while composing. Range checks (``validate``) run right after, before any work,
and name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the key and the fix."""


@dataclass
class ModelConfig:
    """Megatron-core GPT backbone with MoE layers."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    #: FFN width of layers that are dense (only used when ``moe_layer_freq`` leaves some layers dense).
    ffn_hidden_size: int = 256
    #: Routed experts per MoE layer; 0 turns every layer into a dense FFN.
    num_experts: int = 8
    moe_router_topk: int = 2
    #: FFN width of one routed expert.
    moe_ffn_hidden_size: int = 128
    #: FFN width of the always-on shared expert (0: none).
    moe_shared_expert_intermediate_size: int = 0
    #: 1: every layer is MoE; k: every k-th layer is MoE, the rest dense.
    moe_layer_freq: int = 1
    moe_aux_loss_coeff: float = 0.01
    #: Megatron token dispatcher: alltoall or allgather.
    moe_token_dispatcher: str = "alltoall"
    init_std: float = 0.02
    rotary_base: int = 10000
    #: Pad the vocabulary to a multiple of this (times TP), as Megatron does.
    make_vocab_size_divisible_by: int = 64
    #: Parameter and activation dtype of the backbone and Engram blocks: bf16 (Megatron's bf16 path: bf16
    #: weights, fp32 main parameters in the optimizer, gradients accumulated and reduced in fp32, router and
    #: Engram gate in fp32), fp32, or auto (bf16 on a GPU, fp32 on CPU).
    precision: str = "auto"
    #: Core attention: te (Transformer Engine layer specs: fused attention, grouped expert GEMMs; GPU with TE
    #: installed), sdpa (torch scaled_dot_product_attention: flash/memory-efficient kernels, no [s, s] scores),
    #: local (Megatron's unfused DotProductAttention), auto (te where it imports on a GPU, else sdpa).
    attention: str = "auto"
    #: Activation recompute: none, selective (Megatron recomputes core attention in the backward), full
    #: (every layer's activations are recomputed from its input: least memory, ~1/3 more compute).
    recompute: str = "none"
    #: Routed experts: grouped (one grouped GEMM per MoE layer: Transformer Engine's where attention is te, else
    #: Megatron's GroupedMLP on torch's grouped matmul; bf16 only there), sequential (one expert after another), or
    #: auto (grouped on a GPU where it runs, sequential on CPU, where it is no faster).
    experts: str = "auto"


@dataclass
class EngramConfig:
    """Engram conditional memory (DESIGN.md section 3) and its host-RAM table (section 4)."""

    #: False gives the MoE baseline: same code, no Engram blocks, no table.
    enabled: bool = True
    #: 0-based backbone layer indices that get an Engram block before their attention.
    layers: list[int] = field(default_factory=lambda: [1])
    #: Suffix n-gram orders hashed at every Engram layer.
    ngram_orders: list[int] = field(default_factory=lambda: [2, 3])
    #: Hash heads per n-gram order; each head has its own prime-sized sub-table.
    heads_per_order: int = 8
    #: Embedding width of one head; a layer's memory vector is heads x orders x head_dim.
    head_dim: int = 32
    #: Target rows of one head table; the real size is the next unused prime at or above it. One int for
    #: every order, or a list with one target per entry of ngram_orders (the demo's engram_vocab_size).
    rows_per_head: Any = 4099
    #: Seed of the hash multipliers (layer l uses seed + 10007 * l).
    seed: int = 0
    #: Short causal depthwise conv kernel; its dilation is the largest n-gram order.
    conv_kernel_size: int = 4
    #: Apply sign(x)*sqrt(|x|) to the gate logit before the sigmoid, as the released demo does.
    gate_signed_sqrt: bool = True
    #: Bias on the key and value projections (the demo's nn.Linear layers have one).
    projection_bias: bool = True
    #: Control run without memory: keep the Engram block but map every n-gram of a head to that head's
    #: single row, so the table holds exactly one row per (layer, order, head) and the block sees one
    #: learned vector per head whatever the context. Compares "Engram's parameters and compute" with
    #: "Engram's memory"; rows_per_head is ignored.
    null_memory: bool = False
    #: Learning-rate multiplier of the table (paper: 5x the backbone's).
    lr_multiplier: float = 5.0
    #: Table optimizer: adam (2 states per element), rowwise_adam, rowwise_adagrad (1 scalar per row).
    optimizer: str = "adam"
    #: Storage dtype of table rows (optimizer math is always fp32).
    table_dtype: str = "float32"
    #: none: look up on the critical path; overlap: prefetch on a background thread; auto: overlap where a
    #: core is free for that thread (backbone on GPU, or fewer compute threads than cores), else none.
    prefetch: str = "auto"
    #: Ranks holding table shards (0: every rank).
    shards: int = 0
    #: Std of the normal init of table rows.
    init_std: float = 0.02
    #: Use DeepSpeed's CPU Adam kernel for the table update where it applies.
    use_cpu_adam: bool = True
    #: Restart the n-gram history after every EOS (the released demo does not).
    reset_at_doc_boundary: bool = False


@dataclass
class ParallelConfig:
    """Backbone parallelism; world = tp x dp, experts split over ep inside dp."""

    tp: int = 1
    ep: int = 1
    #: Backend of the backbone groups: auto picks nccl on GPU, gloo on CPU. The table is always gloo.
    backend: str = "auto"
    #: How backbone gradients become global: coalesced (one flat all-reduce per group after the backward),
    #: megatron_ddp (Megatron-core's DistributedDataParallel: fp32 bucket buffers, all-reduce overlapped
    #: with the backward on GPU), auto (megatron_ddp on GPU, coalesced on CPU). Both give the same gradients.
    grad_sync: str = "auto"
    #: Seconds a collective may wait before a dead peer turns into an error.
    timeout_s: int = 300


@dataclass
class DataConfig:
    """Packed webdataset shards produced by ``python -m data_pipelines.prepare``."""

    #: Folder holding manifest.json, tokenizer.json and the train/val shards.
    path: str = "data/debian-docs"
    #: Tokens per training sequence (shards hold seq_len + 1 tokens per row for the shifted labels).
    seq_len: int = 128
    #: Loader worker processes per rank (they also compute the Engram hash ids).
    num_workers: int = 1
    #: Row streams the training data is read as, fixed for the whole run (0: the first launch's data-parallel
    #: ranks x max(1, num_workers)). Runs with the same streams read the same global order of micro-batches at
    #: any data-parallel size, so a 1-process run reproduces an 8-rank one; ranks x workers that divide it read
    #: each row once, others read shared streams and drop what is not theirs. Needs at least as many shards.
    streams: int = 0
    #: Samples in the shuffle buffer (0: no sample shuffle; shards are always shuffled per epoch).
    shuffle_buffer: int = 64
    #: error: stop at a bad shard; skip: log it, count it in metrics and go on.
    on_bad_shard: str = "error"
    #: Verify every shard's sha256 against the manifest at start-up.
    verify_checksums: bool = True
    #: Read the train shards from these URLs instead of data.path (brace notation, pipe:, http://), in
    #: manifest order, e.g. "pipe:curl -s https://host/ds/train-{000000..000016}.tar"; manifest.json,
    #: tokenizer.json and compression.npy are still read from data.path. Empty: the local shards.
    train_urls: str = ""
    #: Same for the validation shards.
    val_urls: str = ""


@dataclass
class OptimConfig:
    """AdamW for the backbone; the Engram table's optimizer is set in ``engram``."""

    lr: float = 3e-3
    #: Final learning rate as a fraction of ``lr``.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    #: cosine or wsd (warmup-stable-decay).
    schedule: str = "cosine"
    warmup_tokens: int = 50_000
    #: Warmup as a share of the run's tokens; when > 0 it replaces warmup_tokens (sweeps of several run
    #: lengths keep the same schedule shape).
    warmup_fraction: float = 0.0
    #: wsd only: share of the run spent in the final decay.
    decay_fraction: float = 0.2
    #: Clip the global gradient norm (backbone + table) to this; 0 disables.
    grad_clip: float = 1.0
    #: What to do when the loss or gradient norm is NaN/inf: stop or skip the step.
    on_nonfinite: str = "stop"
    #: With on_nonfinite=skip: stop (as with stop) once more steps than this in a row were non-finite; a
    #: model whose every step diverges is dead, and skipping on would "finish" it.
    max_consecutive_skips: int = 3
    #: Megatron-core's DistributedOptimizer instead of torch AdamW (GPU only): Adam moments sharded over
    #: the DP ranks (ZeRO-1), gradients reduce-scattered into Megatron DDP's buffers, parameters
    #: all-gathered after the step. Needs parallel.grad_sync=megatron_ddp or auto.
    distributed: bool = False


@dataclass
class WandbConfig:
    #: offline (a real run folder, sync later), online, or disabled; empty (the default): W&B's own WANDB_MODE
    #: where it is set, else offline (wandb.init's mode argument would otherwise override the variable).
    mode: str = ""
    project: str = "engram-train"
    entity: str | None = None
    #: W&B run name (empty: experiment.name; in a multirun: <experiment.name>/<job folder>).
    name: str = ""
    #: W&B group joining the runs of one sweep (empty: none).
    group: str = ""
    #: W&B job type (train, analysis, ...).
    job_type: str = "train"
    #: Extra W&B tags; a sweep run adds its rho, budget and seed.
    tags: list[str] = field(default_factory=list)
    #: Capture the console (stdout/stderr) into the W&B run's logs.
    console: bool = True
    #: Sample system metrics (CPU, memory, GPU) into the W&B run.
    system_metrics: bool = True
    #: Log each complete checkpoint as a W&B artifact (type checkpoint, aliases step_<n> and latest) that holds
    #: only a reference to its folder: nothing is uploaded or hashed.
    log_checkpoints: bool = False

    def effective_mode(self) -> str:
        return self.mode or os.environ.get("WANDB_MODE") or "offline"


@dataclass
class ExperimentConfig:
    """What one run trains on and for how long; budgets are in tokens."""

    name: str = "tiny"
    seed: int = 1234
    #: Run folder (checkpoints, metrics.jsonl, resolved config, W&B).
    run_dir: str = "outputs/${experiment.name}"
    #: Tokens seen by the whole run.
    total_tokens: int = 1_000_000
    #: Tokens per optimizer step over all data-parallel ranks; accumulation is derived.
    batch_tokens: int = 4096
    #: Sequences per forward/backward on one rank.
    micro_batch_size: int = 16
    log_every: int = 10
    eval_every: int = 100
    #: Validation tokens per evaluation.
    eval_tokens: int = 32768
    #: Save a checkpoint every N steps (0: only at the end).
    checkpoint_every: int = 100
    #: Keep the newest K checkpoints.
    keep_checkpoints: int = 2
    #: Write checkpoints in the background: the step boundary takes a snapshot and training goes on while
    #: forked writers save it; the checkpoint is sealed (COMPLETE) at a later step boundary, before the next
    #: save and always before the run ends or exits for preemption.
    checkpoint_async: bool = False
    #: Peak dense TFLOP/s of one rank's device, for the MFU estimate (0: report achieved TFLOP/s only).
    peak_tflops: float = 0.0
    #: Resume from the newest complete checkpoint in run_dir when one exists.
    auto_resume: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ScalingConfig:
    """The allocation-ratio experiment (engram_train.scaling): rho -> routed experts and Engram rows."""

    #: rho, share of the sparse parameters given to routed experts (1: pure MoE, no Engram; 0: only top-k
    #: experts, the rest is memory). null: train model/engram as given, without planning.
    allocation_ratio: float | None = None
    #: Routed experts of the pure-MoE reference that fixes P_tot and P_act (when the targets below are 0).
    reference_experts: int = 16
    #: Explicit P_tot / P_act targets (0: from the reference model).
    total_params: int = 0
    activated_params: int = 0
    #: Label of the compute budget (W&B tag, analyzer grouping).
    budget: str = ""
    #: Label of the series this run belongs to (engram, null_memory, lr_sweep, ...; analyzer grouping).
    series: str = "engram"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


#: The schema of each Hydra config group.
GROUPS = {
    "model": ModelConfig,
    "engram": EngramConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "experiment": ExperimentConfig,
    "scaling": ScalingConfig,
}


def register_configs() -> None:
    """Register the top-level schema and one schema per group (used by ``defaults: [schema]``)."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for group, schema in GROUPS.items():
        store.store(group=group, name="schema", node=schema)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    _check(value in options, key, value, f"choose one of {', '.join(options)}")


def validate(cfg: Config) -> None:
    """Range and consistency checks that types alone cannot express."""
    m, e, p, d, o, x = cfg.model, cfg.engram, cfg.parallel, cfg.data, cfg.optim, cfg.experiment
    for key, value in [
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("model.moe_ffn_hidden_size", m.moe_ffn_hidden_size),
        ("model.moe_layer_freq", m.moe_layer_freq),
        ("data.seq_len", d.seq_len),
        ("experiment.batch_tokens", x.batch_tokens),
        ("experiment.total_tokens", x.total_tokens),
        ("experiment.micro_batch_size", x.micro_batch_size),
        ("experiment.log_every", x.log_every),
        ("experiment.eval_every", x.eval_every),
        ("experiment.keep_checkpoints", x.keep_checkpoints),
        ("parallel.tp", p.tp),
        ("parallel.ep", p.ep),
        ("parallel.timeout_s", p.timeout_s),
    ]:
        _check(value >= 1, key, value, "must be a positive integer")
    _check(m.num_experts >= 0, "model.num_experts", m.num_experts, "must be >= 0 (0: dense FFN)")
    if m.num_experts:
        _check(
            1 <= m.moe_router_topk <= m.num_experts,
            "model.moe_router_topk",
            m.moe_router_topk,
            f"must be between 1 and model.num_experts={m.num_experts}",
        )
    _check(
        m.hidden_size % m.num_attention_heads == 0,
        "model.hidden_size",
        m.hidden_size,
        f"must be divisible by model.num_attention_heads={m.num_attention_heads}",
    )
    _choice("model.moe_token_dispatcher", m.moe_token_dispatcher, ("alltoall", "allgather"))
    _choice("model.precision", m.precision, ("auto", "bf16", "fp32"))
    _choice("model.attention", m.attention, ("auto", "te", "sdpa", "local"))
    _choice("model.recompute", m.recompute, ("none", "selective", "full"))
    _choice("model.experts", m.experts, ("auto", "grouped", "sequential"))
    _check(m.moe_aux_loss_coeff >= 0, "model.moe_aux_loss_coeff", m.moe_aux_loss_coeff, "must be >= 0")

    if e.enabled:
        _check(len(e.layers) > 0, "engram.layers", e.layers, "list at least one layer (or set engram.enabled=false)")
        for layer in e.layers:
            _check(
                0 <= layer < m.num_layers,
                "engram.layers",
                list(e.layers),
                f"every index must lie in [0, model.num_layers={m.num_layers})",
            )
        _check(len(set(e.layers)) == len(e.layers), "engram.layers", list(e.layers), "indices must be distinct")
        _check(len(e.ngram_orders) > 0, "engram.ngram_orders", e.ngram_orders, "list at least one order >= 2")
        for order in e.ngram_orders:
            _check(2 <= order <= 8, "engram.ngram_orders", list(e.ngram_orders), "every order must be in [2, 8]")
        _check(len(set(e.ngram_orders)) == len(e.ngram_orders), "engram.ngram_orders", list(e.ngram_orders), "orders must be distinct")
        _check(e.heads_per_order >= 1, "engram.heads_per_order", e.heads_per_order, "must be >= 1")
        _check(e.head_dim >= 1, "engram.head_dim", e.head_dim, "must be >= 1")
        rows = e.rows_per_head
        if isinstance(rows, (list, tuple)):
            _check(len(rows) == len(e.ngram_orders), "engram.rows_per_head", list(rows),
                   f"give one target per n-gram order ({len(e.ngram_orders)} for engram.ngram_orders={list(e.ngram_orders)}) or a single int")
            for r in rows:
                _check(isinstance(r, int) and not isinstance(r, bool) and r >= 2, "engram.rows_per_head", list(rows),
                       "every target must be an int >= 2")
        else:
            _check(isinstance(rows, int) and not isinstance(rows, bool) and rows >= 2, "engram.rows_per_head", rows,
                   "must be an int >= 2 or a list of them, one per n-gram order")
        _check(e.conv_kernel_size >= 1, "engram.conv_kernel_size", e.conv_kernel_size, "must be >= 1")
        _check(e.lr_multiplier > 0, "engram.lr_multiplier", e.lr_multiplier, "must be > 0")
        _check(e.init_std > 0, "engram.init_std", e.init_std, "must be > 0")
        _check(e.shards >= 0, "engram.shards", e.shards, "must be >= 0 (0: every rank holds a shard)")
    _choice("engram.optimizer", e.optimizer, ("adam", "rowwise_adam", "rowwise_adagrad"))
    _choice("engram.table_dtype", e.table_dtype, ("float32", "bfloat16"))
    _choice("engram.prefetch", e.prefetch, ("none", "overlap", "auto"))

    _choice("parallel.backend", p.backend, ("auto", "gloo", "nccl"))
    _choice("parallel.grad_sync", p.grad_sync, ("auto", "coalesced", "megatron_ddp"))
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(d.streams >= 0, "data.streams", d.streams, "must be >= 0 (0: the first launch's ranks x workers)")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 0")
    _choice("data.on_bad_shard", d.on_bad_shard, ("error", "skip"))

    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(0 <= o.beta1 < 1, "optim.beta1", o.beta1, "must be in [0, 1)")
    _check(0 <= o.beta2 < 1, "optim.beta2", o.beta2, "must be in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    _choice("optim.schedule", o.schedule, ("cosine", "wsd"))
    _check(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", o.warmup_fraction, "must be in [0, 1) (0: use optim.warmup_tokens)")
    _check(o.warmup_tokens >= 0, "optim.warmup_tokens", o.warmup_tokens, "must be >= 0")
    _check(0 < o.decay_fraction <= 1, "optim.decay_fraction", o.decay_fraction, "must be in (0, 1]")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    _choice("optim.on_nonfinite", o.on_nonfinite, ("stop", "skip"))
    _check(o.max_consecutive_skips >= 1, "optim.max_consecutive_skips", o.max_consecutive_skips,
           "must be at least 1 (with optim.on_nonfinite=skip; use stop to stop at the first non-finite step)")
    _check(not (o.distributed and p.grad_sync == "coalesced"), "parallel.grad_sync", p.grad_sync,
           "must be megatron_ddp or auto with optim.distributed=true: the distributed optimizer steps on the "
           "shards that Megatron DDP reduce-scatters")

    sc = cfg.scaling
    if sc.allocation_ratio is not None:
        _check(0 <= sc.allocation_ratio <= 1, "scaling.allocation_ratio", sc.allocation_ratio, "must be in [0, 1] (or null: no planning)")
        _check(sc.reference_experts > m.moe_router_topk, "scaling.reference_experts", sc.reference_experts,
               f"must exceed model.moe_router_topk={m.moe_router_topk} (the pure-MoE reference needs sparse experts)")
    _check(sc.total_params >= 0 and sc.activated_params >= 0, "scaling.total_params", sc.total_params, "targets must be >= 0 (0: from the reference)")
    _check(x.wandb.effective_mode() in ("offline", "online", "disabled"),
           "experiment.wandb.mode" if x.wandb.mode else "experiment.wandb.mode (empty: from WANDB_MODE)",
           x.wandb.effective_mode(), "choose one of offline, online, disabled")
    _check(x.eval_tokens >= d.seq_len, "experiment.eval_tokens", x.eval_tokens, f"must be >= data.seq_len={d.seq_len}")
    _check(x.checkpoint_every >= 0, "experiment.checkpoint_every", x.checkpoint_every, "must be >= 0 (0: only at the end)")


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed Hydra config into the typed ``Config`` and validate it."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    merged = OmegaConf.merge(OmegaConf.structured(Config), container)
    typed: Config = OmegaConf.to_object(merged)
    validate(typed)
    return typed


register_configs()
