"""Train an Engram-MoE (or, with engram=off, the MoE baseline) language model.

    python -m engram_train.train                                  # tiny run on the prepared corpus
    torchrun --nproc-per-node 2 -m engram_train.train parallel.ep=2

Read top to bottom: build everything from the typed config, resume if a checkpoint exists, then
loop: look up the batch's Engram rows in the host-RAM table, forward/backward the backbone, push
the rows' gradients back to the table owners, clip everything as one model, step both optimizers,
log, evaluate, checkpoint. SIGTERM/SIGUSR1 write a checkpoint at the next step and exit for requeueing.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from engram_train.backbone import build_model
from engram_train.checkpoint import Checkpointer, CheckpointWriteError, rng_state, set_rng_state
from engram_train import relaunch
from engram_train.config import Config, ConfigError, to_config, validate
from engram_train.data import build_train_loader, build_val_loader, open_dataset
from engram_train.engram import NgramHasher
from engram_train.memory import ShardedEngramTable, TablePrefetcher
from engram_train.memory.prefetch import core_is_free_for_prefetch
from engram_train.metrics import MetricsLogger
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
from engram_train.preemption import REQUEUE_EXIT_CODE, PreemptionWatch, hand_over, record_requeue_exit
from engram_train.throughput import flops_per_token, memory_metrics, throughput_metrics
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


def train(cfg: Config, allocation: AllocationPlan | None = None) -> dict:
    """Run training to ``experiment.total_tokens`` (or until preempted); returns the summary as a dict.

    ``allocation`` is the plan that turned ``scaling.allocation_ratio`` into this config (logged and recorded).
    """
    x = cfg.experiment
    run_dir = Path(x.run_dir)
    dims = ParallelDims.from_config(cfg)
    checkpointer = Checkpointer(run_dir, rank=dims.rank, world=dims.world, keep=x.keep_checkpoints,
                                async_save=x.checkpoint_async)
    newest = checkpointer.latest() if x.auto_resume else None
    # Before any work: a relaunch must not resume (and then overwrite) the run with another model or data order.
    changes = relaunch.changes_since(cfg, newest) if newest is not None else {}
    groups = init_process_groups(dims)
    watch = PreemptionWatch()
    try:
        torch.manual_seed(x.seed)
        np.random.seed(x.seed)

        dataset = open_dataset(cfg.data)
        plan = StepPlan.from_config(cfg, data_parallel_world=groups.data_parallel_world)
        hasher = build_hasher(cfg, dataset) if cfg.engram.enabled else None
        model = build_model(cfg, vocab_size=dataset.vocab_size, dims=dims)
        optimizer = configure_optimizer(model, cfg.optim, dims)
        schedule = LRSchedule.from_config(cfg.optim, tokens_per_step=plan.tokens_per_step, total_steps=plan.total_steps)
        table = build_table(cfg, hasher, groups.table) if hasher is not None else None
        prefetcher = None
        if table is not None and prefetch_in_background(cfg, model, groups.table):
            prefetcher = TablePrefetcher(table)
        dp_rank, dp_world = groups.data_parallel_rank, groups.data_parallel_world
        loader = build_train_loader(cfg.data, micro_batch_size=x.micro_batch_size, hasher=hasher, dp_rank=dp_rank,
                                    dp_world=dp_world, seed=x.seed, eos_reset=cfg.engram.reset_at_doc_boundary,
                                    dataset=dataset)

        def val_loader(with_hashes: bool = True):
            return build_val_loader(cfg.data, micro_batch_size=x.micro_batch_size, hasher=hasher if with_hashes else None,
                                    dp_rank=dp_rank, dp_world=dp_world, eos_reset=cfg.engram.reset_at_doc_boundary,
                                    dataset=dataset)

        # Resume from the newest checkpoint that verifies and loads (damaged ones are set aside).
        state, latest = TrainState(), None
        checkpointer.remove_stale_partials()
        loaded = checkpointer.load_newest(model=model, optimizer=optimizer, table=table, dp_rank=dp_rank) if x.auto_resume else None
        if loaded is not None:
            latest, saved, _ = loaded
            if latest != newest:  # fell back: compare with the config the resumed checkpoint was trained with
                changes = relaunch.changes_since(cfg, latest)
            loader.load_state_dict(saved["loader"])
            state = TrainState(**saved["train"])
            set_rng_state(saved["rng"])

        def save_checkpoint() -> Path:
            return checkpointer.save(
                state.step, model=model, optimizer=optimizer, table=table,
                rank_state={"loader": loader.state_dict(), "rng": rng_state(), "train": asdict(state), "dp_rank": dp_rank},
                meta={"tokens_seen": state.tokens_seen, "engram": hasher.config_fingerprint() if hasher else None,
                      "config": relaunch.config_record(cfg)},
            )

        def report_sealed(sealed: Path | None) -> None:
            if sealed is not None:
                logger.print(f"checkpoint {sealed} complete at step {state.step} (written in the background)")

        accounting = count_parameters(cfg)
        run_record = {"params": accounting.to_dict(), **({"allocation": allocation.to_dict()} if allocation else {})}
        logger = MetricsLogger(run_dir, config={**OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), **run_record},
                               wandb_mode=x.wandb.mode, project=x.wandb.project, entity=x.wandb.entity,
                               name=x.wandb.name or x.name, group=x.wandb.group, job_type=x.wandb.job_type,
                               tags=run_tags(cfg, allocation), enabled=dims.is_main, resume_step=state.step)
        if state.step == 0:
            logger.log(0, {f"params/{k}": v for k, v in accounting.to_dict().items()}, console=False)
        if dims.is_main:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        if latest is not None:
            logger.print(f"resumed from {latest} at step {state.step} ({state.tokens_seen:,} tokens)")
        if changes:
            logger.print(f"[yellow]{relaunch.describe(changes, latest)}[/yellow]")
            if dims.is_main:
                relaunch.record(run_dir, changes, latest, state.step)
        logger.print(plan.describe(model, table))
        if allocation is not None:
            logger.print(allocation.describe())
        if table is not None:
            where = "prefetched on a background thread" if prefetcher else "on the critical path"
            logger.print(f"table lookups {where} (engram.prefetch={cfg.engram.prefetch})")
        if dims.world > 1:
            logger.print(f"backbone gradients: {model.grad_sync.description} (parallel.grad_sync={cfg.parallel.grad_sync})")
        logger.print(f"backbone optimizer: {optimizer.description} (optim.distributed={cfg.optim.distributed})")
        entropy = unigram_entropy(val_loader(with_hashes=False), plan.eval_batches, vocab_size=dataset.vocab_size)

        model_flops = flops_per_token(cfg, dataset.vocab_size)
        checkpoint_path, preempted, val = latest, False, ValLoss(float("nan"), float("nan"))
        window, session_tokens, session_seconds = MetricsWindow(), 0, 0.0
        if state.step >= plan.total_steps:
            logger.print(f"[green]{latest} is at step {state.step} of {plan.total_steps}: this run is complete, nothing to "
                         f"train. To train anew, remove {run_dir} or set experiment.name (or experiment.run_dir).[/green]")
            val = evaluate(model, table, val_loader(), plan.eval_batches, dims)
        while state.step < plan.total_steps:
            lr, step_start = schedule(state.step), time.perf_counter()
            result = train_step(model, table, prefetcher, loader, plan, dims)
            grad_norm = global_grad_norm(optimizer.grad_norm_sq(), result.table_grad_norm_sq, table_group=groups.table)
            if math.isfinite(result.loss) and math.isfinite(grad_norm):
                apply_update(optimizer, table, lr=lr, table_lr=lr * cfg.engram.lr_multiplier,
                             clip_scale=clip_coefficient(grad_norm, cfg.optim.grad_clip), dims=dims)
                state.consecutive_skips = 0
            else:
                state.consecutive_skips += 1
                stop_non_finite(cfg.optim, state, loss=result.loss, grad_norm=grad_norm, resume_from=checkpointer.latest())
                discard_gradients(optimizer, table)
                state.skipped_steps += 1
                logger.print(f"[yellow]step {state.step + 1}: non-finite loss={result.loss} grad_norm={grad_norm}; step "
                             f"skipped ({state.consecutive_skips} in a row, at most {cfg.optim.max_consecutive_skips})[/yellow]")

            state.step += 1
            state.tokens_seen += plan.tokens_per_step
            step_seconds = time.perf_counter() - step_start
            window.add(result, plan.tokens_per_step, step_seconds)
            session_tokens, session_seconds = session_tokens + plan.tokens_per_step, session_seconds + step_seconds
            state.train_seconds += step_seconds
            is_last = state.step == plan.total_steps
            evaluate_now = state.step % x.eval_every == 0 or is_last
            if state.step % x.log_every == 0 or is_last or evaluate_now:
                metrics = window.flush(lr=lr, grad_norm=grad_norm, tokens=state.tokens_seen, result=result, model=model,
                                       table=table)
                metrics["skipped_steps"] = state.skipped_steps
                metrics.update(throughput_metrics(metrics["tokens_per_s"], flops_per_token=model_flops, world=dims.world,
                                                  peak_tflops=x.peak_tflops))
                metrics.update(memory_metrics())
                metrics.update(loader.stats())
                state.last_loss = metrics.get("loss", state.last_loss)
                if evaluate_now:
                    val = evaluate(model, table, val_loader(), plan.eval_batches, dims)
                    metrics.update(val_loss=val.mean, val_loss_stderr=val.stderr, val_unigram_entropy=entropy)
                logger.log(state.step, metrics)
                window = MetricsWindow()
            report_sealed(checkpointer.poll())  # collective while an async save is in flight
            preempted = watch.should_stop()
            save_now = preempted or is_last or (x.checkpoint_every and state.step % x.checkpoint_every == 0)
            if save_now and state.consecutive_skips:  # the model may be diverging: keep the good checkpoints
                logger.print(f"[yellow]step {state.step}: no checkpoint while the last {state.consecutive_skips} step(s) "
                             f"were skipped; {checkpoint_path or 'none'} stays the newest[/yellow]")
            elif save_now:
                report_sealed(checkpointer.finalize())  # at most one save in flight
                checkpoint_path = save_checkpoint()
                if preempted or is_last:
                    report_sealed(checkpointer.finalize())  # the run's last checkpoint is complete before it exits
            if preempted:
                logger.print(f"[yellow]{watch.requested or 'a peer'}: checkpoint {checkpoint_path} written at step "
                             f"{state.step}; exiting with {REQUEUE_EXIT_CODE} so the job is requeued[/yellow]")
                break

        summary = {
            "final_train_loss": state.last_loss,
            "final_val_loss": val.mean,
            "val_loss_stderr": val.stderr,
            "val_unigram_entropy": entropy,
            "tokens_seen": state.tokens_seen,
            "tokens_per_s": session_tokens / session_seconds if session_seconds else float("nan"),
            "steps": state.step,
            "skipped_steps": state.skipped_steps,
            "preempted": preempted,
            "stop_signal": watch.requested,
            "checkpoint": str(checkpoint_path) if checkpoint_path else None,
            "wandb_dir": logger.wandb_dir,
            "run_dir": str(run_dir),
        }
        logger.summary(summary)
        if not preempted:
            logger.print(format_summary(summary))
            if dims.is_main:
                write_run_result(run_dir, cfg, summary, run_record, state=asdict(state), flops_per_token=model_flops,
                                 eval_tokens=plan.eval_batches * plan.micro_batch_size * plan.seq_len * dims.dp)
        logger.close()
        if prefetcher is not None:
            prefetcher.close()
        return summary
    except RuntimeError as error:
        raise explain_peer_failure(error, dims) from error
    finally:
        watch.restore()
        destroy_process_groups()


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


def format_summary(summary: dict) -> str:
    lines = [
        "[bold green]training finished[/bold green]",
        f"  final train loss     {summary['final_train_loss']:.4f}",
        f"  final val loss       {summary['final_val_loss']:.4f}   (unigram entropy of val tokens: {summary['val_unigram_entropy']:.4f} nats)",
        f"  tokens               {summary['tokens_seen']:,} in {summary['steps']} steps, {summary['tokens_per_s']:,.0f} tokens/s",
        *([f"  [yellow]skipped steps        {summary['skipped_steps']} (non-finite loss or gradient; no update)[/yellow]"]
          if summary["skipped_steps"] else []),
        f"  checkpoint           {summary['checkpoint']}",
        f"  W&B run (offline)    {summary['wandb_dir']}   (sync: wandb sync {summary['wandb_dir']})",
        f"  metrics              {summary['run_dir']}/metrics.jsonl",
    ]
    return "\n".join(lines)


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


@hydra.main(version_base=None, config_path="../conf", config_name="config")
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
    main()
