"""Golden loss curve: a fixed tiny Engram-MoE config must reproduce the stored per-step losses.

Any change to the numerics (hashing, the Engram block, Megatron settings, optimizer, data order) moves
these numbers; if the change is intended, regenerate with ``UPDATE_GOLDEN=1 pytest tests/integration/test_golden.py``
and say why in the commit.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from .conftest import REPO, TINY_OVERRIDES
from .test_train import read_metrics

pytestmark = pytest.mark.slow

GOLDEN = REPO / "tests" / "assets" / "losses" / "tiny_engram_moe.json"
STEPS = 20


#: torch picks its CPU kernels by the CPU's vector width (AVX2 / AVX-512) at run time, and their float sums round
#: differently: on an AVX-512 machine the default curve drifts by 2e-3 over 20 steps. The golden curve was recorded
#: with torch's AVX2 kernels, which every x86-64 CPU of the last decade has, so the runs pin them.
KERNELS = {"ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the golden curve was recorded with x86-64 AVX2 kernels")
@pytest.mark.parametrize(
    "prefetch,workers",
    [
        ("none", 0),
        # Same curve when the lookups are prefetched (the next micro-batch's during this one's backward)
        # and the ids are deduplicated in a loader worker process: no stale rows, same batches.
        ("overlap", 1),
    ],
)
def test_golden_loss_curve(tiny_dataset, tmp_path, prefetch, workers):
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.num_workers=")]
    cmd = [sys.executable, "-m", "engram_train.train", *overrides, f"data.path={tiny_dataset}", f"experiment.run_dir={run_dir}",
           f"experiment.total_tokens={STEPS * 1024}", "experiment.log_every=1", "experiment.eval_every=1000",
           "experiment.wandb.mode=disabled", f"engram.prefetch={prefetch}", f"data.num_workers={workers}"]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, **KERNELS, "PYTHONWARNINGS": "ignore"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert len(losses) == STEPS
    if os.environ.get("UPDATE_GOLDEN") == "1" and prefetch == "none":
        GOLDEN.write_text(json.dumps({"config": "tests/integration/conftest.py TINY_OVERRIDES", "kernels": KERNELS,
                                      "losses": losses}, indent=1))
        pytest.skip("golden curve rewritten")
    expected = json.loads(GOLDEN.read_text())["losses"]
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-4)
