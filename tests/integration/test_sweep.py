"""A sweep as a user runs it: a Hydra multirun over rho, each job's result.json, a re-run that resumes, the analyzer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engram_train.scaling import count_parameters

from .conftest import REPO, compose_config

pytestmark = pytest.mark.slow


def _measured_parameters(cfg, vocab_size: int) -> tuple[int, int, int]:
    """(P_tot, routed-expert params, table rows) counted on the model and table the trainer builds."""
    from engram_train.backbone import build_model
    from engram_train.parallel import ParallelDims, destroy_process_groups, init_process_groups
    from engram_train.train import build_table
    from engram_train.engram import NgramHasher
    import numpy as np

    dims = ParallelDims.from_config(cfg)
    groups = init_process_groups(dims)
    try:
        model, _ = build_model(cfg, vocab_size=vocab_size, dims=dims)
        names = dict(model.named_parameters())
        vocab = [n for n in names if "word_embeddings" in n or "output_layer" in n]
        assert len(vocab) in (1, 2), vocab
        total = sum(p.numel() for n, p in names.items() if n not in vocab)
        experts = sum(p.numel() for n, p in names.items() if ".experts." in n)
        rows = 0
        if cfg.engram.enabled:
            hasher = NgramHasher.from_config(cfg.engram, np.arange(vocab_size), pad_token_id=0)
            table = build_table(cfg, hasher, groups.table)
            rows = table.num_rows
            total += table.num_rows * table.dim
        return total, experts, rows
    finally:
        destroy_process_groups()


@pytest.mark.parametrize("overrides", [
    ["experiment=sweep_tiny", "scaling.allocation_ratio=0.4"],
    ["experiment=sweep_tiny", "scaling.allocation_ratio=1.0"],
    # the make-train model with a dense layer every other layer, a shared expert and Engram at two layers
    ["model.moe_layer_freq=2", "model.moe_shared_expert_intermediate_size=64", "engram.layers=[0,2]"],
])
def test_accounting_matches_the_model_the_trainer_builds(overrides):
    from engram_train.scaling import apply_allocation

    cfg, _ = apply_allocation(compose_config(*overrides, "experiment.wandb.mode=disabled"))
    acc = count_parameters(cfg)
    total, experts, rows = _measured_parameters(cfg, vocab_size=4096)
    assert acc.total == total
    assert acc.engram_rows == rows
    m = cfg.model
    moe_layers = sum(1 for i in range(m.num_layers) if i % m.moe_layer_freq == 0)
    per_expert = experts // (moe_layers * m.num_experts)
    assert acc.expert_sparse == moe_layers * (m.num_experts - m.moe_router_topk) * per_expert


def _sweep(data: Path, sweep_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "engram_train.train", "-m", "experiment=sweep_tiny", f"data.path={data}",
           "data.seq_len=64", "experiment.total_tokens=24576", "experiment.eval_tokens=2048", "experiment.log_every=2",
           f"hydra.sweep.dir={sweep_dir}", "scaling.allocation_ratio=0.5,1.0", *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "ATEN_CPU_CAPABILITY": "avx2"}  # as launch/sweep_allocation.sh
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_multirun_over_rho_then_rerun_then_analyze(tiny_dataset, tmp_path):
    sweep_dir = tmp_path / "sweep"
    first = _sweep(tiny_dataset, sweep_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    # Each job trains in a folder named after its own overrides.
    runs = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.rglob("result.json")}
    assert sorted(name.rsplit(",", 1)[-1] for name in runs) == ["scaling.allocation_ratio=0.5", "scaling.allocation_ratio=1.0"]
    by_rho = {run["requested_allocation_ratio"]: run for run in runs.values()}
    moe, engram = by_rho[1.0], by_rho[0.5]
    assert not moe["engram"] and moe["realised_allocation_ratio"] == 1.0 and moe["params"]["engram_rows"] == 0
    assert engram["engram"] and 0.4 < engram["realised_allocation_ratio"] < 0.6
    # Same budgets: P_tot within 1%, P_act within half a shared-expert column (3 x 32 x 2 / 2 parameters).
    assert abs(engram["params"]["total"] - moe["params"]["total"]) <= 0.01 * moe["params"]["total"]
    assert abs(engram["params"]["activated"] - moe["params"]["activated"]) <= 96
    for run in runs.values():
        assert run["tokens"] == 24576 and run["steps"] == 6 and run["budget"] == "tiny" and run["series"] == "engram"
        assert run["flops"] == pytest.approx(run["flops_per_token"] * 24576)
        assert 0 < run["val_loss_stderr"] < 0.5 and run["wall_time_s"] > 0 and run["tokens_per_s"] > 0
        # Where it ran: the kernels the environment pinned, this torch, this machine's CPU by name.
        machine, cpuinfo = run["machine"], Path("/proc/cpuinfo").read_text()
        assert machine["torch"] == torch.__version__
        assert machine["aten_cpu_capability"] == "AVX2" or " avx2" not in cpuinfo
        assert machine["cpu"] not in ("", "x86_64") and f": {machine['cpu']}\n" in cpuinfo
    # The accounting is in the run's metrics (step 0), its resolved config and its W&B run.
    for name, run in runs.items():
        run_dir = sweep_dir / name
        first_record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        assert first_record["step"] == 0 and first_record["params/total"] == run["params"]["total"]
        config = (run_dir / "config.yaml").read_text()
        assert f"num_experts: {run['params']['routed_experts']}" in config
        wandb_file = next(run_dir.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
        rho = run["requested_allocation_ratio"]
        for text in ("sweep_tiny", f"rho={rho:g}", "budget=tiny", "seed=1234", f"sweep_tiny/{name}"):
            assert text.encode() in wandb_file, f"W&B run of {name} lacks {text!r} (group, tags, name)"

    # The same command again: every job finds its finished checkpoint, trains nothing, and reports the same loss.
    again = _sweep(tiny_dataset, sweep_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("this run is complete, nothing to train") == 2
    assert "nan" not in again.stdout.lower() and again.stdout.count("no steps this session") == 2, again.stdout[-3000:]
    # the sync hint names every session's segment of the one W&B run, not only the last
    assert again.stdout.count("/wandb/offline-run-*)") == 2, again.stdout[-3000:]
    for name, run in runs.items():
        assert json.loads((sweep_dir / name / "result.json").read_text())["final_val_loss"] == run["final_val_loss"]

    out = tmp_path / "analysis"
    analysis = subprocess.run([sys.executable, "-m", "engram_train.sweep", "analyze", str(sweep_dir), "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline"})
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "| engram | 0.50 |" in summary and "| engram | 1.00 | 1.000 | 16 | 0 |" in summary
    assert (out / "allocation_ratio.png").stat().st_size > 10_000
    assert any(out.glob("wandb/offline-run-*/run-*.wandb")), "the table and plot go to a W&B analysis run"
    missing = subprocess.run([sys.executable, "-m", "engram_train.sweep", "analyze", str(tmp_path / "nope")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nope: no such sweep folder" in missing.stderr
