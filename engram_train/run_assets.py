"""What a checkpoint needs besides tensors to be used on its own: the tokenizer and the Engram compression table.

They are copied from the dataset into ``<run_dir>/assets/`` (rank 0, once, checked against the sha256 the
dataset's manifest records, which ``open_dataset`` has verified), and every checkpoint's ``meta.json`` records
their sha256. A resume refuses a checkpoint whose tokenizer or compression table differs from the dataset's: the
token shards can be identical while the compression table (hence every Engram hash id) changed.
"""

from __future__ import annotations

from pathlib import Path

from engram_train.atomic_files import atomic_copy
from engram_train.checkpoint import file_sha256
from engram_train.config import ConfigError

#: File name in the dataset and the run folder -> the manifest field holding its sha256.
ASSETS = {"tokenizer.json": "tokenizer_sha256", "compression.npy": "compression_sha256"}


def keep_run_assets(dataset, run_dir: Path, *, is_main: bool) -> dict[str, str]:
    """Copy the dataset's tokenizer and compression table into ``run_dir/assets`` (rank 0, where missing); returns
    {path relative to the run folder: sha256}, what each checkpoint records. A copy that differs from the
    dataset's means the run was trained on other data: refused before any work, the run folder untouched."""
    recorded = {}
    for name, field in ASSETS.items():
        digest = dataset.manifest[field]
        kept = run_dir / "assets" / name
        if kept.is_file() and file_sha256(kept) != digest:
            raise ConfigError(
                f"{kept} (sha256 {file_sha256(kept)[:12]}...) differs from data.path's {name} ({digest[:12]}...): this "
                "run was trained with another tokenizer or compression table, so its hash ids would differ. Resume on "
                "the dataset it was trained on, or start a new run (experiment.name / experiment.run_dir)")
        if is_main and not kept.is_file():
            kept.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(dataset.path / name, kept)
        recorded[f"assets/{name}"] = digest
    return recorded


def check_same_assets(now: dict[str, str], checkpoint: Path, meta: dict) -> None:
    """Refuse to resume ``checkpoint`` when it was trained with another tokenizer or compression table (a run
    folder from before assets were kept, or whose assets/ was removed)."""
    for name, digest in meta.get("assets", {}).items():
        if now.get(name) != digest:
            raise ConfigError(
                f"{checkpoint}: trained with a {name.removeprefix('assets/')} of sha256 {digest[:12]}..., but data.path's "
                f"is {str(now.get(name))[:12]}...: its hash ids would differ. Resume with the dataset it was trained on, "
                "or start a new run (experiment.name / experiment.run_dir)")
