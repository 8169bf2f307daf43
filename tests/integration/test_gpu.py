"""The GPU path: the backbone on CUDA (NCCL group), rows copied to and from the GPU, Megatron DDP, Megatron's
DistributedOptimizer (``optim.distributed``), bf16 and the fused attention kernels. Skipped without CUDA: CI has
no GPU, so these run whenever a GPU machine is lent (``pytest tests/integration/test_gpu.py`` there)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from engram_train.train import train

from .test_resume import _losses

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]

STEPS = 10


def _config(tiny_config, run_dir, *extra: str):
    return tiny_config(f"experiment.run_dir={run_dir}", f"experiment.total_tokens={STEPS * 1024}",
                       "experiment.log_every=1", "experiment.eval_every=1000", "experiment.wandb.mode=disabled", *extra)


def test_distributed_optimizer_follows_the_torch_adamw_curve_on_gpu(tiny_config, tmp_path):
    """Same model and data, Megatron DDP in both: only the optimizer differs, so the curves agree up to GPU
    reduction order. Rows come from the host table each micro-batch, so this also runs the CUDA copies."""
    reference = train(_config(tiny_config, tmp_path / "torch", "parallel.grad_sync=megatron_ddp", "model.precision=fp32"))
    distributed = train(_config(tiny_config, tmp_path / "dist", "optim.distributed=true", "model.precision=fp32"))
    assert reference["steps"] == distributed["steps"] == STEPS
    torch_losses, dist_losses = _losses(tmp_path / "torch"), _losses(tmp_path / "dist")
    assert len(torch_losses) == STEPS and np.isfinite(dist_losses).all()
    np.testing.assert_allclose(dist_losses, torch_losses, rtol=2e-3)
    assert dist_losses[-1] < dist_losses[0]


def test_distributed_optimizer_checkpoint_resumes_the_same_curve_on_gpu(tiny_config, tmp_path):
    whole = tmp_path / "whole"
    train(_config(tiny_config, whole, "optim.distributed=true", "model.precision=fp32", "experiment.checkpoint_every=5"))
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    summary = train(_config(tiny_config, resumed, "optim.distributed=true", "model.precision=fp32",
                            "experiment.checkpoint_every=5"))
    assert summary["steps"] == STEPS
    np.testing.assert_allclose(_losses(resumed), _losses(whole)[5:], rtol=1e-4)


def test_bf16_follows_fp32_and_sdpa_equals_local_attention_on_gpu(tiny_config, tmp_path):
    """model.precision=auto is bf16 on a GPU; its curve stays near fp32's (the CPU test's tolerance), the fused
    attention auto picks (TE where it imports, else SDPA) gives local attention's fp32 curve, local attention runs
    in bf16 too (Megatron's fused softmax kernels only where they import), and the grouped expert GEMM auto picks
    follows the sequential experts."""
    from engram_train.backbone.kernels import Kernels

    runs = {name: (tmp_path / name, extra) for name, extra in {
        "fp32-local": ("model.precision=fp32", "model.attention=local"),
        "fp32-auto": ("model.precision=fp32",),
        "bf16-auto": (),
        "bf16-local": ("model.attention=local",),
        "bf16-sequential": ("model.experts=sequential",),
    }.items()}
    for run_dir, extra in runs.values():
        train(_config(tiny_config, run_dir, *extra))
    losses = {name: np.array(_losses(run_dir)) for name, (run_dir, _) in runs.items()}
    kernels = Kernels.resolve(_config(tiny_config, tmp_path / "x").model, on_gpu=True)
    # Transformer Engine runs fp32 GEMMs as TF32 (its cuBLASLt path), torch's local/SDPA path does not (TF32 off)
    np.testing.assert_allclose(losses["fp32-auto"], losses["fp32-local"], rtol=1e-2 if kernels.attention == "te" else 2e-3)
    np.testing.assert_allclose(losses["bf16-auto"], losses["fp32-local"], rtol=0, atol=0.05)
    np.testing.assert_allclose(losses["bf16-local"], losses["bf16-auto"], rtol=0, atol=0.05)
    # bf16 auto runs the experts as one grouped GEMM (TE's, or torch's under Megatron's GroupedMLP)
    assert kernels.grouped_gemm
    np.testing.assert_allclose(losses["bf16-auto"], losses["bf16-sequential"], rtol=0, atol=0.02)


def test_rows_reach_the_gpu_through_pinned_buffers_on_a_side_stream_unchanged():
    """RowTransfer: every micro-batch's rows (copied from another thread, as the prefetcher does) and gradients
    (back to the host) arrive exactly, with the two pinned buffers per direction reused many times."""
    from concurrent.futures import ThreadPoolExecutor

    from engram_train.memory import RowTransfer

    transfer = RowTransfer.for_device(torch.device("cuda", torch.cuda.current_device()))
    generator = torch.Generator().manual_seed(0)
    with ThreadPoolExecutor(max_workers=1) as thread:
        for step in range(20):
            rows = torch.randn(4 + step % 3, 64, 32, generator=generator)
            pending = thread.submit(transfer.to_device, rows).result()
            on_gpu = transfer.wait(pending) * 2  # compute-stream work right after the wait
            assert pending.rows.device.type == "cuda" and pending.rows.untyped_storage().data_ptr() != rows.data_ptr()
            torch.testing.assert_close(on_gpu.cpu(), rows * 2, rtol=0, atol=0)
            back = transfer.to_host(on_gpu)
            assert back.is_pinned() and back.device.type == "cpu"
            torch.testing.assert_close(back, rows * 2, rtol=0, atol=0)


def test_prefetched_rows_on_the_side_stream_give_the_critical_path_curve(tiny_config, tmp_path):
    """engram.prefetch=overlap (the thread starts each copy) and none (the copy starts at the first Engram layer)
    give the same fp32 losses: the compute stream never reads rows before their copy landed."""
    for prefetch in ("none", "overlap"):
        train(_config(tiny_config, tmp_path / prefetch, "model.precision=fp32", f"engram.prefetch={prefetch}"))
    # not bit for bit: CUDA's embedding backward accumulates with atomics, so GPU runs differ in the last bits
    np.testing.assert_allclose(_losses(tmp_path / "overlap"), _losses(tmp_path / "none"), rtol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: 2 GPUs")
def test_two_ranks_on_nccl_with_experts_and_table_sharded_follow_the_one_gpu_curve(tiny_dataset, tmp_path):
    """torchrun, 2 ranks on 2 GPUs: NCCL for the backbone (EP=2, Megatron DDP), gloo for the host table sharded over
    both ranks. data.streams=2 gives one process on one GPU the same global order of micro-batches, so fp32 curves
    agree up to reduction order (the CPU tests' tolerances: test_resume.EARLY_ATOL / ELASTIC_ATOL)."""
    from .test_resume import EARLY_ATOL, ELASTIC_ATOL, _run, _single, _torchrun

    same = ["experiment.micro_batch_size=4", "data.streams=2", "model.precision=fp32"]
    _run(_single(tiny_dataset, tmp_path / "one", *same))
    _run(_torchrun(tiny_dataset, tmp_path / "two", *same, "parallel.ep=2", "parallel.backend=nccl"))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two)
    np.testing.assert_allclose(two[:5], one[:5], rtol=0, atol=EARLY_ATOL * 10)  # GPU kernels: a looser start
    np.testing.assert_allclose(two, one, rtol=0, atol=ELASTIC_ATOL * 4)
