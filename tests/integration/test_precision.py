"""bf16 mixed precision end to end: the tiny Engram-MoE trained in bf16 follows its fp32 curve for 50 steps,
and a bf16 checkpoint (bf16 weights + fp32 main parameters + moments) resumes the same curve."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from engram_train.train import train

from .test_resume import _losses

pytestmark = pytest.mark.slow

STEPS = 50
#: Largest gap between the bf16 and fp32 per-step losses (nats), measured 0.0167 (Intel Xeon, 2026-12-03): bf16 weights
#: round to 8 bits, so the curves part by rounding noise, not by a trend.
CURVE_ATOL = 0.05


def _config(tiny_config, run_dir, *extra: str):
    return tiny_config(f"experiment.run_dir={run_dir}", f"experiment.total_tokens={STEPS * 1024}",
                       "experiment.log_every=1", "experiment.eval_every=1000", "experiment.wandb.mode=disabled",
                       "experiment.checkpoint_every=25", "experiment.keep_checkpoints=2", *extra)


def test_bf16_follows_the_fp32_curve_and_resumes_exactly(tiny_config, tmp_path):
    fp32 = train(_config(tiny_config, tmp_path / "fp32", "model.precision=fp32"))
    bf16 = train(_config(tiny_config, tmp_path / "bf16", "model.precision=bf16"))
    assert fp32["steps"] == bf16["steps"] == STEPS
    fp32_losses, bf16_losses = np.array(_losses(tmp_path / "fp32")), np.array(_losses(tmp_path / "bf16"))
    print("max |bf16 - fp32| loss:", np.abs(bf16_losses - fp32_losses).max(), "final", fp32_losses[-1], bf16_losses[-1])
    assert len(bf16_losses) == STEPS and not np.array_equal(bf16_losses, fp32_losses), "bf16 must really run in bf16"
    np.testing.assert_allclose(bf16_losses, fp32_losses, rtol=0, atol=CURVE_ATOL)
    assert bf16_losses[-1] < bf16_losses[0] - 0.5
    assert abs(bf16["final_val_loss"] - fp32["final_val_loss"]) < CURVE_ATOL

    # Resume the bf16 run from its step-25 checkpoint: bf16 weights, fp32 main parameters and moments restored,
    # the second half must repeat bit for bit (fp32 main parameters re-rounded from bf16 would not).
    resumed = tmp_path / "bf16-resumed"
    shutil.copytree(tmp_path / "bf16", resumed)
    shutil.rmtree(sorted((resumed / "checkpoints").glob("step_*"))[-1])
    train(_config(tiny_config, resumed, "model.precision=bf16"))
    assert _losses(resumed) == list(bf16_losses)
