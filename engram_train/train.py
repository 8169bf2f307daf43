"""Train an Engram-MoE (or, with engram=off, the MoE baseline) language model.

    python -m engram_train.train                                  # tiny run on the prepared corpus
    torchrun --nproc-per-node 2 -m engram_train.train parallel.ep=2

Read top to bottom: build everything from the typed config, resume if a checkpoint exists, then
loop: look up the batch's Engram rows in the host-RAM table, forward/backward the backbone, push
the rows' gradients back to the table owners, clip everything as one model, step both optimizers.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from engram_train.backbone import build_model
from engram_train.checkpoint import Checkpointer, rng_state, set_rng_state
from engram_train.config import Config, ConfigError, to_config
from engram_train.data import build_train_loader, build_val_loader, open_dataset
from engram_train.engram import NgramHasher
from engram_train.memory import ShardedEngramTable, TablePrefetcher
from engram_train.metrics import MetricsLogger
from engram_train.optim import LRSchedule, clip_coefficient, configure_optimizer, global_grad_norm
from engram_train.parallel import ParallelDims, destroy_process_groups, init_process_groups
from engram_train.train_step import StepPlan, TrainState, evaluate, unigram_entropy, train_step


def build_hasher(cfg: Config, dataset) -> NgramHasher:
    """The n-gram hasher for this run; n-gram history is padded with the dataset's EOS id."""
    return NgramHasher.from_config(cfg.engram, dataset.compression, pad_token_id=dataset.eos_id)


class NonFiniteLossError(RuntimeError):
    """Loss or gradient norm became NaN/inf with optim.on_nonfinite=stop."""


def train(cfg: Config) -> dict:
    """Run training to ``experiment.total_tokens``; returns the printed summary as a dict."""
    x = cfg.experiment
    run_dir = Path(x.run_dir)
    dims = ParallelDims.from_config(cfg)
    groups = init_process_groups(dims)
    try:
        torch.manual_seed(x.seed)
        np.random.seed(x.seed)

        dataset = open_dataset(cfg.data)
        plan = StepPlan.from_config(cfg, data_parallel_world=groups.data_parallel_world)
        hasher = build_hasher(cfg, dataset) if cfg.engram.enabled else None

        model = build_model(cfg, vocab_size=dataset.vocab_size, dims=dims)
        optimizer = configure_optimizer(model, cfg.optim)
        schedule = LRSchedule.from_config(cfg.optim, tokens_per_step=plan.tokens_per_step, total_steps=plan.total_steps)
        table = None
        if hasher is not None:
            table = ShardedEngramTable(
                hasher.num_rows,
                cfg.engram.head_dim,
                group=groups.table,
                optimizer=cfg.engram.optimizer,
                lr=cfg.optim.lr * cfg.engram.lr_multiplier,
                betas=(cfg.optim.beta1, cfg.optim.beta2),
                eps=cfg.optim.eps,
                table_dtype=cfg.engram.table_dtype,
                init_std=cfg.engram.init_std,
                seed=x.seed,
                use_cpu_adam=cfg.engram.use_cpu_adam,
                fingerprint=hasher.config_fingerprint(),
            )
        prefetcher = TablePrefetcher(table) if table is not None and cfg.engram.prefetch == "overlap" else None

        loader = build_train_loader(
            cfg.data,
            micro_batch_size=x.micro_batch_size,
            hasher=hasher,
            dp_rank=groups.data_parallel_rank,
            dp_world=groups.data_parallel_world,
            seed=x.seed,
            eos_reset=cfg.engram.reset_at_doc_boundary,
        )

        state = TrainState()
        checkpointer = Checkpointer(run_dir, rank=dims.rank, world=dims.world, keep=x.keep_checkpoints)
        latest = checkpointer.latest() if x.auto_resume else None
        if latest is not None:
            saved, _ = checkpointer.load(latest)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            loader.load_state_dict(saved["loader"])
            if table is not None:
                table.load(latest)
            state = TrainState(**saved["train"])
            set_rng_state(saved["rng"])

        logger = MetricsLogger(
            run_dir,
            config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            wandb_mode=x.wandb.mode,
            project=x.wandb.project,
            entity=x.wandb.entity,
            name=x.name,
            enabled=dims.is_main,
            resume_step=state.step,
        )
        if latest is not None:
            logger.print(f"resumed from {latest} at step {state.step} ({state.tokens_seen:,} tokens)")
        logger.print(plan.describe(model, table))
        if dims.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

        def save_checkpoint(step: int) -> Path:
            return checkpointer.save(
                step,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "loader": loader.state_dict(),
                    "rng": rng_state(),
                    "train": asdict(state),
                },
                meta={"tokens_seen": state.tokens_seen, "engram": hasher.config_fingerprint() if hasher else None},
                extra_writers=[table.save] if table is not None else [],
            )

        val_batches = plan.eval_batches
        entropy = unigram_entropy(build_val_loader(cfg.data, micro_batch_size=x.micro_batch_size, hasher=None,
                                                   dp_rank=groups.data_parallel_rank, dp_world=groups.data_parallel_world),
                                  val_batches, vocab_size=dataset.vocab_size)

        def validation_loss() -> float:
            val_loader = build_val_loader(cfg.data, micro_batch_size=x.micro_batch_size, hasher=hasher,
                                          dp_rank=groups.data_parallel_rank, dp_world=groups.data_parallel_world)
            return evaluate(model, table, val_loader, val_batches, dims)

        checkpoint_path = latest
        window_loss, window_tokens, window_table_wait, window_start = [], 0, 0.0, time.perf_counter()
        val_loss = float("nan")
        while state.step < plan.total_steps:
            lr = schedule(state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr

            result = train_step(model, table, prefetcher, loader, plan, dims)

            grad_norm = global_grad_norm(result.backbone_grad_norm_sq, result.table_grad_norm_sq, table_group=groups.table)
            finite = math.isfinite(result.loss) and math.isfinite(grad_norm)
            if not finite:
                if cfg.optim.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"step {state.step}: loss={result.loss} grad_norm={grad_norm}; no checkpoint written for it. "
                        "Lower optim.lr, check the data, or set optim.on_nonfinite=skip"
                    )
                optimizer.zero_grad(set_to_none=True)
                if table is not None:
                    table.zero_grad()
                state.skipped_steps += 1
                logger.print(f"[yellow]step {state.step}: non-finite loss/grad, step skipped[/yellow]")
            else:
                scale = clip_coefficient(grad_norm, cfg.optim.grad_clip)
                if scale < 1.0:
                    for param in model.parameters():
                        if param.grad is not None:
                            param.grad.mul_(scale)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if table is not None:
                    # Owners summed the gradients of all DP replicas; the backbone's are averaged.
                    table.step(lr * cfg.engram.lr_multiplier, grad_scale=scale / dims.dp)

            state.step += 1
            state.tokens_seen += plan.tokens_per_step
            window_loss.append(result.loss)
            window_tokens += plan.tokens_per_step
            window_table_wait += result.table_wait_s

            is_last = state.step == plan.total_steps
            if state.step % x.log_every == 0 or is_last:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": float(np.mean(window_loss)),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": state.tokens_seen,
                    "tokens_per_s": window_tokens / elapsed,
                    **result.moe_stats,
                    **{f"engram_gate/layer_{k}": v for k, v in result.gate_means.items()},
                }
                if table is not None:
                    metrics.update({f"table/{k}": v for k, v in table.stats().items()})
                    metrics["table_wait_share"] = window_table_wait / elapsed
                state.last_loss = metrics["loss"]
                if state.step % x.eval_every == 0 or is_last:
                    val_loss = validation_loss()
                    metrics["val_loss"] = val_loss
                    metrics["val_unigram_entropy"] = entropy
                logger.log(state.step, metrics)
                window_loss, window_tokens, window_table_wait, window_start = [], 0, 0.0, time.perf_counter()
            elif state.step % x.eval_every == 0:
                val_loss = validation_loss()
                logger.log(state.step, {"val_loss": val_loss, "val_unigram_entropy": entropy})
            if (x.checkpoint_every and state.step % x.checkpoint_every == 0) or is_last:
                checkpoint_path = save_checkpoint(state.step)

        summary = {
            "final_train_loss": state.last_loss,
            "final_val_loss": val_loss,
            "val_unigram_entropy": entropy,
            "tokens_seen": state.tokens_seen,
            "steps": state.step,
            "skipped_steps": state.skipped_steps,
            "checkpoint": str(checkpoint_path) if checkpoint_path else None,
            "wandb_dir": logger.wandb_dir,
            "run_dir": str(run_dir),
        }
        logger.summary(summary)
        logger.print(format_summary(summary))
        logger.close()
        return summary
    finally:
        destroy_process_groups()


def format_summary(summary: dict) -> str:
    lines = [
        "[bold green]training finished[/bold green]",
        f"  final train loss     {summary['final_train_loss']:.4f}",
        f"  final val loss       {summary['final_val_loss']:.4f}   (unigram entropy of val tokens: {summary['val_unigram_entropy']:.4f} nats)",
        f"  tokens               {summary['tokens_seen']:,} in {summary['steps']} steps",
        f"  checkpoint           {summary['checkpoint']}",
        f"  W&B run (offline)    {summary['wandb_dir']}   (sync: wandb sync {summary['wandb_dir']})",
        f"  metrics              {summary['run_dir']}/metrics.jsonl",
    ]
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    try:
        cfg = to_config(dict_cfg)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    train(cfg)


if __name__ == "__main__":
    main()
