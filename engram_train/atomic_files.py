"""Whole-or-absent files: a reader (a resume, the sweep collector) never sees a half-written one.

Every file the framework writes for later reading goes through ``atomic_write``: write to a temporary name in
the same folder, fsync, rename over the target. A crash leaves either the old file or the new one, and a stray
``*.tmp`` that no reader looks at. Folders made of several files (a checkpoint step) are made whole by the
Checkpointer's marker instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write(file)`` to a temporary name, fsync, rename to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_copy(source: Path, path: Path) -> None:
    with open(source, "rb") as src:
        atomic_write(path, lambda f: shutil.copyfileobj(src, f))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
