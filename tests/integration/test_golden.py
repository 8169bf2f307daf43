"""Golden loss curve: a fixed tiny Engram-MoE config must reproduce the stored per-step losses.

Any change to the numerics (hashing, the Engram block, Megatron settings, optimizer, data order) moves
these numbers; if the change is intended, regenerate with ``UPDATE_GOLDEN=1 pytest tests/integration/test_golden.py``
and say why in the commit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engram_train.train import train

from .conftest import REPO
from .test_train import read_metrics

pytestmark = pytest.mark.slow

GOLDEN = REPO / "tests" / "assets" / "losses" / "tiny_engram_moe.json"
STEPS = 20


@pytest.mark.parametrize(
    "prefetch,workers",
    [
        ("none", 0),
        # Same curve when the lookups are prefetched (the next micro-batch's during this one's backward)
        # and the ids are deduplicated in a loader worker process: no stale rows, same batches.
        ("overlap", 1),
    ],
)
def test_golden_loss_curve(tiny_config, prefetch, workers):
    cfg = tiny_config(f"experiment.total_tokens={STEPS * 1024}", "experiment.log_every=1", "experiment.eval_every=1000",
                      "experiment.wandb.mode=disabled", f"engram.prefetch={prefetch}", f"data.num_workers={workers}")
    train(cfg)
    losses = [m["loss"] for m in read_metrics(cfg.experiment.run_dir) if "loss" in m]
    assert len(losses) == STEPS
    if os.environ.get("UPDATE_GOLDEN") == "1" and prefetch == "none":
        GOLDEN.write_text(json.dumps({"config": "tests/integration/conftest.py TINY_OVERRIDES", "losses": losses}, indent=1))
        pytest.skip("golden curve rewritten")
    expected = json.loads(GOLDEN.read_text())["losses"]
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-4)
