"""Test helpers shared by the test packages."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kernel_cache_dir() -> str:
    """DeepSpeed's kernel cache of this machine's CPU model (``launch/torchrun.sh --print-extensions-dir``, which
    returns TORCH_EXTENSIONS_DIR where set): its kernels are built with -march=native, so each CPU model has its own."""
    return subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "--print-extensions-dir"], check=True,
                          capture_output=True, text=True).stdout.strip()
