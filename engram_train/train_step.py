"""One optimizer step (gradient accumulation over micro-batches) and evaluation.

Split from train.py so the loop there stays a page long; everything here is per-step mechanics.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from engram_train.config import Config, ConfigError
from engram_train.memory import DeviceRows, RowTransfer, UniqueIds


@dataclass
class TrainState:
    """Counters saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    #: Non-finite steps in a row up to now (optim.max_consecutive_skips).
    consecutive_skips: int = 0
    last_loss: float = float("nan")
    #: Seconds spent in training steps over every session of this run (resumes included).
    train_seconds: float = 0.0

    def advance(self, tokens: int, seconds: float) -> None:
        """One optimizer step done (updated or skipped)."""
        self.step += 1
        self.tokens_seen += tokens
        self.train_seconds += seconds


@dataclass(frozen=True)
class StepPlan:
    """Batch geometry derived from token budgets: accumulation steps, run length, eval size."""

    seq_len: int
    micro_batch_size: int
    accumulation: int
    data_parallel_world: int
    total_steps: int
    eval_batches: int

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size * self.accumulation * self.data_parallel_world

    @classmethod
    def from_config(cls, cfg: Config, *, data_parallel_world: int) -> "StepPlan":
        x, seq_len = cfg.experiment, cfg.data.seq_len
        per_micro_step = seq_len * x.micro_batch_size * data_parallel_world
        if x.batch_tokens % per_micro_step:
            raise ConfigError(
                f"experiment.batch_tokens={x.batch_tokens} is not a multiple of data.seq_len x "
                f"experiment.micro_batch_size x data-parallel ranks = {seq_len} x {x.micro_batch_size} x "
                f"{data_parallel_world} = {per_micro_step}; use a multiple such as {per_micro_step * max(1, x.batch_tokens // per_micro_step)}"
            )
        total_steps = x.total_tokens // x.batch_tokens
        if total_steps < 1:
            raise ConfigError(
                f"experiment.total_tokens={x.total_tokens} is less than one step of experiment.batch_tokens={x.batch_tokens}"
            )
        return cls(
            seq_len=seq_len,
            micro_batch_size=x.micro_batch_size,
            accumulation=x.batch_tokens // per_micro_step,
            data_parallel_world=data_parallel_world,
            total_steps=total_steps,
            eval_batches=max(1, math.ceil(x.eval_tokens / per_micro_step)),
        )

    def describe(self, model, table) -> str:
        counts = model.num_parameters()
        if table is None:
            parts = f"model: backbone {counts['backbone']:,} params (MoE baseline, no Engram)"
        else:
            parts = (f"model: backbone {counts['backbone']:,} params, Engram blocks {counts['engram_blocks']:,}, "
                     f"Engram table {table.num_rows * table.dim:,} ({table.num_rows:,} rows)")
        return parts + (
            f"\nplan: {self.total_steps} steps x {self.tokens_per_step:,} tokens "
            f"({self.accumulation} micro-batches of {self.micro_batch_size}x{self.seq_len} on {self.data_parallel_world} DP ranks)"
        )


@dataclass
class StepResult:
    loss: float
    table_grad_norm_sq: float
    table_wait_s: float
    gate_means: dict = field(default_factory=dict)


class EngramLookup:
    """This micro-batch's table rows, fetched once per data-parallel replica and shared inside its TP group.

    TP peers see identical tokens, so only TP rank 0 asks the table; the others take part in the table's
    collectives with no ids and receive the rows by broadcast. With a prefetcher the lookup was started
    before the forward, and ``__call__`` (reached at the first Engram layer) only waits for it.
    """

    def __init__(self, table, hash_ids: torch.Tensor, tp_group, prefetcher=None, device=torch.device("cpu"),
                 unique: UniqueIds | None = None):
        self.table, self.hash_ids, self.tp_group, self.prefetcher = table, hash_ids, tp_group, prefetcher
        self.device = device
        self.transfer = RowTransfer.for_device(device)  # pinned buffers and a side stream on a GPU
        self.is_leader = tp_group is None or dist.get_rank(tp_group) == 0
        self.own_ids = hash_ids if self.is_leader else hash_ids[:0]
        self.unique = unique if self.is_leader else None
        self.rows: torch.Tensor | None = None
        self.wait_s = 0.0
        if prefetcher is not None:
            prefetcher.submit(self.own_ids, self.unique)

    def __call__(self) -> torch.Tensor:
        if self.rows is None:
            start = time.perf_counter()
            rows = self.prefetcher.result() if self.prefetcher is not None else self.table.lookup(self.own_ids, self.unique)
            if self.tp_group is not None or self.device.type != "cpu":
                # The table lives in host RAM; the model (and the TP group's backend) may be on a GPU. A prefetch
                # thread has already started the copy; the compute stream waits for it here, at the first Engram layer.
                shape = (*self.hash_ids.shape, self.table.dim)
                if self.is_leader:
                    pending = rows if isinstance(rows, DeviceRows) else self.transfer.to_device(rows)
                    shared = self.transfer.wait(pending).detach()
                else:
                    shared = torch.empty(shape, dtype=self.table.dtype, device=self.device)
                if self.tp_group is not None:
                    dist.broadcast(shared, group=self.tp_group, group_src=0)
                rows = shared.requires_grad_()
            self.rows = rows
            self.wait_s = time.perf_counter() - start
        return self.rows

    def push_gradients(self) -> None:
        """Collective over the table group: TP-sum the rows' gradient, the leader sends it to the owners."""
        start = time.perf_counter()
        self.table.wait_for_prefetch()  # the next micro-batch's prefetch, if still running, issues its collectives first
        self.wait_s += time.perf_counter() - start
        grad = self.rows.grad
        if self.tp_group is not None:
            dist.all_reduce(grad, group=self.tp_group)
        grad = self.transfer.to_host(grad)
        self.table.accumulate_grad(self.own_ids, grad if self.is_leader else grad[:0])


def train_step(model, grad_sync, table, prefetcher, loader, plan: StepPlan, dims) -> StepResult:
    """Forward/backward ``plan.accumulation`` micro-batches, then make gradients global (DP/TP/EP) with
    ``grad_sync`` (``build_model``'s)."""
    model.train()
    model.moe_load.reset()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / plan.accumulation))
    tp_group = parallel_state.get_tensor_model_parallel_group() if dims.tp > 1 else None
    device = next(model.parameters()).device
    losses, table_wait_s = [], 0.0

    def start(batch) -> EngramLookup | None:
        if table is None:
            return None
        return EngramLookup(table, batch["hash_ids"], tp_group, prefetcher, device, unique=batch.get("hash_unique"))

    batch = next(loader)
    lookup = start(batch)
    grad_sync.start()
    for micro in range(plan.accumulation):
        tokens = batch["tokens"].to(device, non_blocking=True)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        if lookup is not None and prefetcher is None:
            lookup()  # without prefetch the lookup sits on the critical path, before the forward
        loss = model(inputs, labels, engram_rows=lookup).mean()
        if micro + 1 < plan.accumulation:
            # The rows do not change until the optimizer step, so the next micro-batch's lookup
            # (prefetched) overlaps this one's backward.
            batch = next(loader)
            next_lookup = start(batch)
        with grad_sync.no_sync() if micro + 1 < plan.accumulation else contextlib.nullcontext():
            (loss / plan.accumulation).backward()
        if lookup is not None:
            lookup.push_gradients()
            table_wait_s += lookup.wait_s
        losses.append(loss.detach())
        if micro + 1 < plan.accumulation:
            lookup = next_lookup
    grad_sync.finish()
    loss = torch.stack(losses).mean()
    if dims.dp > 1:
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss /= dims.dp
    return StepResult(
        loss=float(loss),
        table_grad_norm_sq=table.grad_norm_sq() / dims.dp**2 if table is not None else 0.0,
        table_wait_s=table_wait_s,
        gate_means=model.gate_means(),
    )


def apply_update(optimizer, table, *, lr: float, table_lr: float, clip_scale: float, dims) -> None:
    """Step the backbone optimizer and the table's sparse optimizer with one clip scale."""
    optimizer.step(lr=lr, clip_scale=clip_scale)
    if table is not None:
        # Owners summed the row gradients of all DP replicas; the backbone's are averaged.
        table.step(table_lr, grad_scale=clip_scale / dims.dp)


def discard_gradients(optimizer, table) -> None:
    optimizer.zero_grad()
    if table is not None:
        table.zero_grad()


class MetricsWindow:
    """Averages over the steps between two log lines: loss, throughput, time spent waiting for the table.

    Throughput counts training-step time only (forward, backward, update), not evaluation or checkpoints.
    """

    def __init__(self):
        self.losses: list[float] = []
        self.tokens = 0
        self.table_wait_s = 0.0
        self.step_s = 0.0

    def add(self, result: StepResult, tokens: int, seconds: float) -> None:
        self.losses.append(result.loss)
        self.tokens += tokens
        self.table_wait_s += result.table_wait_s
        self.step_s += seconds

    def flush(self, *, lr: float, grad_norm: float, tokens: int, result: StepResult, model, table) -> dict:
        """Collective (MoE load is summed over ranks): call on every rank, before evaluation forwards."""
        elapsed = max(self.step_s, 1e-9)
        metrics = {
            "loss": sum(self.losses) / len(self.losses),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": self.tokens / elapsed,
            # Routing counts of the last step only: summed over ranks here, not on every step.
            **model.moe_load.summary(dist.group.WORLD if dist.get_world_size() > 1 else None),
            **{f"engram_gate/layer_{layer}": gate for layer, gate in result.gate_means.items()},
        }
        if table is not None:
            metrics.update({f"table/{key}": value for key, value in table.stats().items()})
            metrics["table_wait_share"] = self.table_wait_s / elapsed
        return metrics


@dataclass(frozen=True)
class ValLoss:
    """Mean per-token validation loss and its sampling error (std of per-sequence means / sqrt(sequences))."""

    mean: float
    stderr: float
    #: Engram gate histogram per layer over this rank's validation tokens (``EngramBlock.take_eval_gate_counts``).
    gate_histograms: dict = field(default_factory=dict)


@torch.no_grad()
def evaluate(model, table, val_loader, batches: int, dims) -> ValLoss:
    """Loss over the first ``batches`` validation batches of every DP rank (deterministic)."""
    model.eval()
    tp_group = parallel_state.get_tensor_model_parallel_group() if dims.tp > 1 else None
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, tokens, sum of squared sequence means, sequences
    for batch in itertools.islice(val_loader, batches):
        tokens = batch["tokens"].to(device, non_blocking=True)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        lookup = EngramLookup(table, batch["hash_ids"], tp_group, device=device) if table is not None else None
        per_token = model(inputs, labels, engram_rows=lookup() if lookup is not None else None).double()
        per_sequence = per_token.reshape(tokens.shape[0], -1).mean(dim=1)
        sums += torch.stack([per_token.sum(), torch.tensor(float(per_token.numel()), dtype=torch.float64, device=device),
                             per_sequence.square().sum(), torch.tensor(float(per_sequence.numel()), dtype=torch.float64, device=device)])
    model.train()
    if dims.dp > 1:
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    if sums[1] == 0:
        raise RuntimeError("validation split yielded no batches; re-run data preparation with a validation split")
    mean, sequences = float(sums[0] / sums[1]), float(sums[3])
    variance = max(0.0, float(sums[2]) / sequences - mean * mean) * sequences / max(1.0, sequences - 1)
    return ValLoss(mean, math.sqrt(variance / sequences), model.take_eval_gate_histograms())


def unigram_entropy(val_loader, batches: int, *, vocab_size: int) -> float:
    """Entropy (nats) of the validation targets' unigram distribution: the loss of a context-free model."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in itertools.islice(val_loader, batches):
        counts += torch.bincount(batch["tokens"][:, 1:].reshape(-1), minlength=vocab_size)[:vocab_size].double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())
