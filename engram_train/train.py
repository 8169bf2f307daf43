"""Train an Engram-MoE (or, with engram=off, the MoE baseline) language model.

    python -m engram_train.train                                  # tiny run on the prepared corpus
    torchrun --nproc-per-node 2 -m engram_train.train parallel.ep=2

Read top to bottom: build everything from the typed config, resume if a checkpoint exists, then
loop: look up the batch's Engram rows in the host-RAM table, forward/backward the backbone, push
the rows' gradients back to the table owners, clip everything as one model, step both optimizers,
log, evaluate, checkpoint. SIGTERM/SIGUSR1 write a checkpoint at the next step and exit for requeueing.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m engram_train.train --help` (and completion) before torch and Megatron load
    from engram_train.config_help import answered_without_training

    if answered_without_training():
        raise SystemExit(0)

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from engram_train.atomic_files import atomic_write_text
from engram_train.backbone import build_model
from engram_train.checkpoint import Checkpointer, CheckpointWriteError, rng_state, set_rng_state
from engram_train import relaunch
from engram_train.config import Config, ConfigError, to_config, validate
from engram_train.data import build_train_loader, build_val_loader, open_dataset
from engram_train.engram import NgramHasher
from engram_train.memory import ShardedEngramTable, TablePrefetcher
from engram_train.memory.prefetch import core_is_free_for_prefetch
from engram_train.metrics import HISTOGRAM_PREFIX, MetricsLogger, use_own_wandb_service
from engram_train.optim import (
    LRSchedule,
    clip_coefficient,
    configure_optimizer,
    global_grad_norm,
)
from engram_train.parallel import (
    ParallelDims,
    destroy_process_groups,
    explain_peer_failure,
    init_process_groups,
    on_every_rank,
)
from engram_train.scaling import AllocationPlan, apply_allocation, count_parameters
from engram_train.sweep import write_run_result
from engram_train.run_assets import check_same_assets, keep_run_assets
from engram_train.preemption import REQUEUE_EXIT_CODE, PreemptionWatch, hand_over, record_requeue_exit
from engram_train.throughput import flops_per_token, machine, memory_metrics, throughput_metrics
from engram_train.train_step import (
    MetricsWindow,
    StepPlan,
    TrainState,
    apply_update,
    discard_gradients,
    evaluate,
    train_step,
    unigram_entropy,
    ValLoss,
)


class NonFiniteLossError(RuntimeError):
    """Loss or gradient norm became NaN/inf with optim.on_nonfinite=stop."""


def build_hasher(cfg: Config, dataset) -> NgramHasher:
    """The n-gram hasher for this run; n-gram history is padded with the dataset's EOS id."""
    return NgramHasher.from_config(cfg.engram, dataset.compression, pad_token_id=dataset.eos_id)


def build_table(cfg: Config, hasher: NgramHasher, group) -> ShardedEngramTable:
    """The host-RAM table: this rank allocates only its own rows and their optimizer state."""
    return ShardedEngramTable(
        hasher.num_rows,
        cfg.engram.head_dim,
        group=group,
        optimizer=cfg.engram.optimizer,
        lr=cfg.optim.lr * cfg.engram.lr_multiplier,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        table_dtype=cfg.engram.table_dtype,
        init_std=cfg.engram.init_std,
        seed=cfg.experiment.seed,
        use_cpu_adam=cfg.engram.use_cpu_adam,
        fingerprint=hasher.config_fingerprint(),
    )


@dataclass
class TrainingRun:
    """Everything a run is built from, built once from the config (what torchtitan's Trainer holds)."""

    cfg: Config
    dims: ParallelDims
    groups: Any
    dataset: Any
    plan: StepPlan
    hasher: NgramHasher | None
    model: Any
    grad_sync: Any
    optimizer: Any
    schedule: LRSchedule
    table: ShardedEngramTable | None
    prefetcher: TablePrefetcher | None
    loader: Any
    checkpointer: Checkpointer
    watch: PreemptionWatch
    accounting: Any
    flops_per_token: float
    #: The tokenizer and compression table copied into the run folder: {path in the run folder: sha256}.
    assets: dict[str, str]

    def val_loader(self, with_hashes: bool = True):
        x = self.cfg.experiment
        return build_val_loader(self.cfg.data, micro_batch_size=x.micro_batch_size,
                                hasher=self.hasher if with_hashes else None, dp_rank=self.groups.data_parallel_rank,
                                dp_world=self.groups.data_parallel_world, eos_reset=self.cfg.engram.reset_at_doc_boundary,
                                dataset=self.dataset)

    def evaluate(self) -> ValLoss:
        return evaluate(self.model, self.table, self.val_loader(), self.plan.eval_batches, self.dims)

    def snapshot(self, state: TrainState) -> tuple[dict, dict]:
        """What a checkpoint holds besides the model, optimizer and table: this rank's state, and the run's meta
        (with the loader's global position). Collective."""
        rank_state = {"rng": rng_state(), "train": asdict(state), "dp_rank": self.groups.data_parallel_rank}
        meta = {"tokens_seen": state.tokens_seen, "engram": self.hasher.config_fingerprint() if self.hasher else None,
                "config": relaunch.config_record(self.cfg), "assets": self.assets,
                "precision": self.model.kernels.precision,  # model.precision=auto resolves by device
                "loader": self.loader.global_state_dict()}  # collective: the position of every rank's stream
        return rank_state, meta


def build_run(cfg: Config, dims: ParallelDims, groups, checkpointer: Checkpointer, watch: PreemptionWatch,
              stack: contextlib.ExitStack) -> TrainingRun:
    """Data, model, optimizers, table and loaders, in the order their dependencies need; closed by ``stack``."""
    x = cfg.experiment
    torch.manual_seed(x.seed)
    np.random.seed(x.seed)
    dataset = open_dataset(cfg.data)
    plan = StepPlan.from_config(cfg, data_parallel_world=groups.data_parallel_world)
    hasher = build_hasher(cfg, dataset) if cfg.engram.enabled else None
    model, grad_sync = build_model(cfg, vocab_size=dataset.vocab_size, dims=dims)
    optimizer = configure_optimizer(model, grad_sync, cfg.optim, dims)
    table = build_table(cfg, hasher, groups.table) if hasher is not None else None
    prefetcher = None
    if table is not None and prefetch_in_background(cfg, model, groups.table):
        prefetcher = TablePrefetcher.for_device(table, next(model.parameters()).device)
        prefetcher = stack.enter_context(contextlib.closing(prefetcher))
    loader = build_train_loader(cfg.data, micro_batch_size=x.micro_batch_size, hasher=hasher,
                                dp_rank=groups.data_parallel_rank, dp_world=groups.data_parallel_world, seed=x.seed,
                                eos_reset=cfg.engram.reset_at_doc_boundary, dataset=dataset)
    stack.callback(loader.close)
    return TrainingRun(
        cfg=cfg, dims=dims, groups=groups, dataset=dataset, plan=plan, hasher=hasher, model=model, grad_sync=grad_sync,
        optimizer=optimizer,
        schedule=LRSchedule.from_config(cfg.optim, tokens_per_step=plan.tokens_per_step, total_steps=plan.total_steps),
        table=table, prefetcher=prefetcher, loader=loader, checkpointer=checkpointer, watch=watch,
        accounting=count_parameters(cfg), flops_per_token=flops_per_token(cfg, dataset.vocab_size),
        assets=keep_run_assets(dataset, Path(x.run_dir), is_main=dims.is_main))


def resume(run: TrainingRun, newest: Path | None) -> tuple[TrainState, Path | None]:
    """Load the newest checkpoint that verifies and loads (damaged ones are set aside); a fresh state if none.

    ``newest``: the newest complete checkpoint found at start-up (None without one, or with auto_resume off)."""
    run.checkpointer.remove_stale_partials()
    if newest is None:
        return TrainState(), None
    # Before loading: another compression table fails deep in the table's loader otherwise.
    check_same_assets(run.assets, newest, relaunch.saved_meta(newest))
    relaunch.check_same_precision(run.model.kernels.precision, newest, relaunch.saved_meta(newest))
    loaded = run.checkpointer.load_newest(model=run.model, optimizer=run.optimizer, table=run.table,
                                          dp_rank=run.groups.data_parallel_rank)
    if loaded is None:
        return TrainState(), None
    latest, saved, meta = loaded
    check_same_assets(run.assets, latest, meta)  # a fallback to an older checkpoint is checked too
    run.loader.load_state_dict(saved["loader"])
    set_rng_state(saved["rng"])
    return TrainState(**saved["train"]), latest


def open_logger(run: TrainingRun, state: TrainState, allocation: AllocationPlan | None,
                stack: contextlib.ExitStack) -> MetricsLogger:
    """metrics.jsonl, console and W&B (rank 0); finished with the run's exit code on every exit path."""
    cfg, x = run.cfg, run.cfg.experiment
    record = {"params": run.accounting.to_dict(), "flops_per_token": run.flops_per_token, "world_size": run.dims.world,
              "data_parallel_size": run.dims.dp,
              **({"allocation": allocation.to_dict()} if allocation else {})}
    logger = MetricsLogger(Path(x.run_dir), config={**OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), **record},
                           wandb=x.wandb, name=x.wandb.name or x.name, tags=run_tags(cfg, allocation),
                           enabled=run.dims.is_main, resume_step=state.step, total_steps=run.plan.total_steps)
    stack.push(lambda kind, error, trace: logger.close(exit_code=None if kind is None else 1))
    if x.wandb.log_checkpoints:
        run.checkpointer.on_sealed = logger.log_checkpoint
    if state.step == 0:
        logger.log(0, {f"params/{k}": v for k, v in run.accounting.to_dict().items()}, console=False)
    if run.dims.is_main:
        atomic_write_text(Path(x.run_dir) / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return logger


def announce(run: TrainingRun, logger: MetricsLogger, allocation: AllocationPlan | None) -> None:
    cfg = run.cfg
    logger.print(run.plan.describe(run.model, run.table))
    logger.print(f"kernels: {run.model.kernels.describe()} (model.precision={cfg.model.precision}, "
                 f"model.attention={cfg.model.attention}, model.recompute={cfg.model.recompute}, "
                 f"model.experts={cfg.model.experts})")
    if allocation is not None:
        logger.print(allocation.describe())
    if run.table is not None:
        where = "prefetched on a background thread" if run.prefetcher else "on the critical path"
        logger.print(f"table lookups {where} (engram.prefetch={cfg.engram.prefetch})")
    if run.dims.world > 1:
        logger.print(f"backbone gradients: {run.grad_sync.description} (parallel.grad_sync={cfg.parallel.grad_sync})")
    logger.print(f"backbone optimizer: {run.optimizer.description} (optim.distributed={cfg.optim.distributed})")


def train(cfg: Config, allocation: AllocationPlan | None = None) -> dict:
    """Run training to ``experiment.total_tokens`` (or until preempted); returns the summary as a dict.

    ``allocation`` is the plan that turned ``scaling.allocation_ratio`` into this config (logged and recorded).
    """
    x, started = cfg.experiment, time.perf_counter()
    dims = ParallelDims.from_config(cfg)
    checkpointer = Checkpointer(Path(x.run_dir), rank=dims.rank, world=dims.world, keep=x.keep_checkpoints,
                                async_save=x.checkpoint_async)
    newest = checkpointer.latest() if x.auto_resume else None
    # Before any work: a relaunch must not resume (and then overwrite) the run with another model or data order.
    changes = relaunch.changes_since(cfg, newest) if newest is not None else {}
    with contextlib.ExitStack() as stack:  # closes in reverse on every exit path
        groups = init_process_groups(dims)
        stack.callback(destroy_process_groups)
        watch = PreemptionWatch()
        stack.callback(watch.restore)
        stack.push(lambda kind, error, trace: checkpointer.abandon() if kind is not None else None)
        try:
            run = build_run(cfg, dims, groups, checkpointer, watch, stack)
            state, latest = resume(run, newest)
            if latest is not None and latest != newest:  # fell back: compare with the config it was trained with
                changes = relaunch.changes_since(cfg, latest)
            logger = open_logger(run, state, allocation, stack)
            if latest is not None:
                logger.print(f"resumed from {latest} at step {state.step} ({state.tokens_seen:,} tokens)")
            if changes:
                logger.print(f"[yellow]{relaunch.describe(changes, latest)}[/yellow]")
                if dims.is_main:
                    relaunch.record(Path(x.run_dir), changes, latest, state.step)
            announce(run, logger, allocation)
            summary = train_loop(run, state, logger, latest)
            summary["session_wall_seconds"] = time.perf_counter() - started  # build, steps, evaluation, checkpoints
            finish(run, state, logger, summary, allocation)
            return summary
        except RuntimeError as error:
            explained = explain_peer_failure(error, dims)
            if explained is error:
                raise  # keeps its own cause (``raise error from error`` would replace it)
            raise explained from error


def train_loop(run: TrainingRun, state: TrainState, logger: MetricsLogger, latest: Path | None) -> dict:
    """Step until the token budget is spent or a stop signal arrives; the run's summary."""
    x, plan = run.cfg.experiment, run.plan
    entropy = unigram_entropy(run.val_loader(with_hashes=False), plan.eval_batches, vocab_size=run.dataset.vocab_size)
    checkpoint, preempted, val = latest, False, ValLoss(float("nan"), float("nan"))
    window, start = MetricsWindow(), TrainState(**asdict(state))
    if state.step >= plan.total_steps:
        logger.print(f"[green]{latest} is at step {state.step} of {plan.total_steps}: this run is complete, nothing to "
                     f"train. To train anew, remove {x.run_dir} or set experiment.name (or experiment.run_dir).[/green]")
        val = run.evaluate()
    while state.step < plan.total_steps:
        lr, step_start = run.schedule(state.step), time.perf_counter()
        result = train_step(run.model, run.grad_sync, run.table, run.prefetcher, run.loader, plan, run.dims)
        grad_norm = global_grad_norm(run.optimizer.grad_norm_sq(), result.table_grad_norm_sq, table_group=run.groups.table)
        update_or_skip(run, state, logger, loss=result.loss, grad_norm=grad_norm, lr=lr)
        seconds = time.perf_counter() - step_start
        state.advance(plan.tokens_per_step, seconds)
        window.add(result, plan.tokens_per_step, seconds)
        last = state.step == plan.total_steps
        evaluate_now = state.step % x.eval_every == 0 or last
        if state.step % x.log_every == 0 or last or evaluate_now:
            metrics = step_metrics(run, state, window, lr=lr, grad_norm=grad_norm, result=result)
            if evaluate_now:
                val = run.evaluate()
                metrics.update(val_loss=val.mean, val_loss_stderr=val.stderr, val_unigram_entropy=entropy,
                               **{f"{HISTOGRAM_PREFIX}layer_{k}": v for k, v in val.gate_histograms.items()})
            logger.log(state.step, metrics, eta_s=eta_seconds(state, start, plan.total_steps))
            window = MetricsWindow()
        preempted = run.watch.should_stop()
        saved = run.checkpointer.maybe_save(
            state.step, last=last, preempted=preempted, every=x.checkpoint_every, skipping=state.consecutive_skips,
            model=run.model, optimizer=run.optimizer, table=run.table, snapshot=lambda: run.snapshot(state), say=logger.print)
        checkpoint = saved or checkpoint
        if preempted:
            logger.print(f"[yellow]{run.watch.requested or 'a peer'}: checkpoint {checkpoint} written at step "
                         f"{state.step}; exiting with {REQUEUE_EXIT_CODE} so the job is requeued[/yellow]")
            break
    session_s = state.train_seconds - start.train_seconds
    return {
        "final_train_loss": state.last_loss,
        "final_val_loss": val.mean,
        "val_loss_stderr": val.stderr,
        "val_unigram_entropy": entropy,
        "tokens_seen": state.tokens_seen,
        "tokens_per_s": (state.tokens_seen - start.tokens_seen) / session_s if session_s else float("nan"),
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_seconds": state.train_seconds,
        "preempted": preempted,
        "stop_signal": run.watch.requested,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "wandb_dir": logger.wandb_dir,
        "wandb_mode": x.wandb.effective_mode(),
        "run_dir": str(x.run_dir),
    }


def step_metrics(run: TrainingRun, state: TrainState, window: MetricsWindow, *, lr: float, grad_norm: float,
                 result) -> dict:
    """The logged record of a step: the window's averages, throughput, memory, data counters (collective)."""
    metrics = window.flush(lr=lr, grad_norm=grad_norm, tokens=state.tokens_seen, result=result, model=run.model,
                           table=run.table)
    metrics["skipped_steps"] = state.skipped_steps
    metrics.update(throughput_metrics(metrics["tokens_per_s"], flops_per_token=run.flops_per_token, world=run.dims.world,
                                      peak_tflops=run.cfg.experiment.peak_tflops))
    metrics.update(memory_metrics())
    metrics.update(run.loader.stats())
    state.last_loss = metrics.get("loss", state.last_loss)
    return metrics


def eta_seconds(state: TrainState, start: TrainState, total_steps: int) -> float | None:
    """Training time left at this session's pace (evaluation and checkpoints not included)."""
    steps = state.step - start.step
    return (total_steps - state.step) * (state.train_seconds - start.train_seconds) / steps if steps else None


def finish(run: TrainingRun, state: TrainState, logger: MetricsLogger, summary: dict,
           allocation: AllocationPlan | None) -> None:
    """The summary to W&B and the console, and result.json; a run stopped for requeue only marks W&B preempting."""
    # A relaunch of a finished run takes no step: its NaN speed must not overwrite the real one in W&B.
    kept = {k: v for k, v in summary.items() if not (k == "tokens_per_s" and not math.isfinite(v))}
    logger.summary({**kept, "flops_per_token": run.flops_per_token, "world_size": run.dims.world,
                    "data_parallel_size": run.dims.dp,
                    **{f"params/{k}": v for k, v in run.accounting.to_dict().items()}})
    if summary["preempted"]:
        logger.preempted(REQUEUE_EXIT_CODE)
        return
    logger.print(format_summary(summary, run.accounting))
    if run.dims.is_main:
        record = {"params": run.accounting.to_dict(), **({"allocation": allocation.to_dict()} if allocation else {})}
        write_run_result(Path(run.cfg.experiment.run_dir), run.cfg, summary, record, state=asdict(state),
                         flops_per_token=run.flops_per_token,
                         eval_tokens=run.plan.eval_batches * run.plan.micro_batch_size * run.plan.seq_len * run.dims.dp,
                         machine=machine())


def update_or_skip(run: TrainingRun, state: TrainState, logger: MetricsLogger, *, loss: float, grad_norm: float,
                   lr: float) -> None:
    """Apply the step's update, or with a non-finite loss or gradient discard it (optim.on_nonfinite decides
    whether the run goes on)."""
    cfg = run.cfg
    if math.isfinite(loss) and math.isfinite(grad_norm):
        apply_update(run.optimizer, run.table, lr=lr, table_lr=lr * cfg.engram.lr_multiplier,
                     clip_scale=clip_coefficient(grad_norm, cfg.optim.grad_clip), dims=run.dims)
        state.consecutive_skips = 0
        return
    state.consecutive_skips += 1
    stop_non_finite(cfg.optim, state, loss=loss, grad_norm=grad_norm, resume_from=run.checkpointer.latest())
    discard_gradients(run.optimizer, run.table)
    state.skipped_steps += 1
    logger.print(f"[yellow]step {state.step + 1}: non-finite loss={loss} grad_norm={grad_norm}; step "
                 f"skipped ({state.consecutive_skips} in a row, at most {cfg.optim.max_consecutive_skips})[/yellow]")


def stop_non_finite(optim, state: TrainState, *, loss: float, grad_norm: float, resume_from: Path | None) -> None:
    """Raise ``NonFiniteLossError`` when optim.on_nonfinite says this non-finite step ends the run."""
    step = state.step + 1  # numbered as the console and metrics.jsonl number it
    advice = (f"Resume from {resume_from or 'scratch'} with a lower optim.lr or check the data; the run folder "
              "keeps its last good checkpoint")
    if optim.on_nonfinite == "stop":
        raise NonFiniteLossError(f"step {step}: loss={loss} grad_norm={grad_norm}; stopped without updating. {advice}, "
                                 "or set optim.on_nonfinite=skip")
    if state.consecutive_skips > optim.max_consecutive_skips:
        raise NonFiniteLossError(
            f"step {step}: loss={loss} grad_norm={grad_norm}; {state.consecutive_skips} non-finite steps in a row "
            f"(optim.max_consecutive_skips={optim.max_consecutive_skips}): the model is diverging, stopped. {advice}")


def format_summary(summary: dict, accounting=None) -> str:
    speed = (f"{summary['tokens_per_s']:,.0f} tokens/s this session" if math.isfinite(summary["tokens_per_s"])
             else "no steps this session")
    lines = [
        "[bold green]training finished[/bold green]",
        f"  final train loss     {summary['final_train_loss']:.4f}",
        f"  final val loss       {summary['final_val_loss']:.4f}   (unigram entropy of val tokens: {summary['val_unigram_entropy']:.4f} nats)",
        f"  tokens               {summary['tokens_seen']:,} in {summary['steps']} steps, {speed}",
        f"  training time        {_duration(summary['train_seconds'])} over all sessions (steps only)",
        f"  wall time            {_duration(summary['session_wall_seconds'])} this session (start-up, steps, evaluation, "
        "checkpoints)",
        *([f"  parameters           {accounting.total:,} total, {accounting.activated:,} activated per token "
           "(without embedding and LM head)"] if accounting is not None else []),
        *([f"  [yellow]skipped steps        {summary['skipped_steps']} (non-finite loss or gradient; no update)[/yellow]"]
          if summary["skipped_steps"] else []),
        f"  checkpoint           {summary['checkpoint']}",
        # every segment of the run (one per session, the same W&B run id): syncing only the last loses the rest
        (f"  W&B run (offline)    {summary['wandb_dir']}   (sync: wandb sync {Path(summary['wandb_dir']).parent}/offline-run-*)"
         if summary.get("wandb_mode", "offline") == "offline" else f"  W&B run (online)     {summary['wandb_dir']}")
        if summary["wandb_dir"] else "  W&B run              none (W&B mode disabled)",
        f"  metrics              {summary['run_dir']}/metrics.jsonl",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def run_tags(cfg: Config, allocation: AllocationPlan | None) -> list[str]:
    """W&B tags: the user's, plus rho, budget, series and seed for the runs of a sweep."""
    tags = list(cfg.experiment.wandb.tags)
    if allocation is not None:
        tags.append(f"rho={allocation.requested_ratio:g}")
    if cfg.scaling.budget:
        tags += [f"budget={cfg.scaling.budget}", f"series={cfg.scaling.series}"]
    if allocation is not None or cfg.scaling.budget:
        tags.append(f"seed={cfg.experiment.seed}")
    return tags


def prefetch_in_background(cfg: Config, model, table_group) -> bool:
    """``engram.prefetch``: overlap always, auto where every rank has a core free for the thread, none never.

    All ranks decide alike (a MIN over them): the lookup's collectives run at a different point of the
    step with and without the thread, so a mixed choice would pair mismatched collectives.
    """
    mode = cfg.engram.prefetch
    if mode != "auto":
        return mode == "overlap"
    device = next(model.parameters()).device
    return on_every_rank(core_is_free_for_prefetch(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))), table_group)


def use_job_run_dir_in_sweeps(dict_cfg: DictConfig) -> None:
    """In a multirun, each job trains in ``<hydra.sweep.dir>/<hydra.sweep.subdir>`` unless ``experiment.run_dir``
    is given: the default (``outputs/<experiment.name>``) would make every job of a sweep write to, and resume
    from, the same checkpoints."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    if any(o.split("=", 1)[0].lstrip("+~") == "experiment.run_dir" for o in hydra_cfg.overrides.task):
        return
    dict_cfg.experiment.run_dir = str(Path(hydra_cfg.sweep.dir) / str(hydra_cfg.sweep.subdir))
    if not dict_cfg.experiment.wandb.name:
        dict_cfg.experiment.wandb.name = f"{dict_cfg.experiment.name}/{hydra_cfg.sweep.subdir}"


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    use_job_run_dir_in_sweeps(dict_cfg)
    try:
        cfg, allocation = apply_allocation(to_config(dict_cfg))
        validate(cfg)
        summary = train(cfg, allocation)
    except ConfigError as error:  # composition, validation, and the checks that need the data or the run folder
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLossError, CheckpointWriteError) as error:  # the message says what to change and how to resume
        print(f"training stopped: {error}", file=sys.stderr)
        sys.exit(1)
    if summary["preempted"]:
        hand_over(summary["stop_signal"])  # under submitit, rank 0 requeues the job here and exits
        record_requeue_exit()
        sys.exit(REQUEUE_EXIT_CODE)


if __name__ == "__main__":
    use_own_wandb_service()
    main()
