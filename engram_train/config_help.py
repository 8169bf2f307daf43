"""Answer ``--help`` from the config schema, and Hydra's compose-only flags, without importing torch or Megatron
(about a second instead of ~16 s): both entry points (the ``engram-train`` command and ``python -m
engram_train.train``) ask here first, so the trainer never imports the command module that imports it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path

import hydra

from engram_train import config as schema  # registers the schema with Hydra's ConfigStore

CONF = Path(__file__).parent / "conf"


def field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comment lines above each field of a schema dataclass (the field docs of config.py)."""
    lines = inspect.getsource(cls).splitlines()
    docs: dict[str, str] = {}
    for node in ast.parse(inspect.getsource(cls)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment, row = [], node.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#:"):
                comment.insert(0, lines[row].strip()[2:].strip())
                row -= 1
            docs[node.target.id] = " ".join(comment)
    return docs


def help_text() -> str:
    out = ["engram-train: pretrain Engram-MoE language models (Hydra: every key below can be overridden)", "", "Usage: engram-train [group=preset ...] [key=value ...] [-m for a sweep]",
           "", "Presets (conf/<group>/<preset>.yaml):"]
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        out.append(f"  {group.name}: {', '.join(sorted(f.stem for f in group.glob('*.yaml')))}")
    for name, cls in schema.GROUPS.items():
        out += ["", f"{name}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}".rstrip()]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(default):
                sub = ", ".join(g.name for g in dataclasses.fields(default))
                out.append(f"  {name}.{f.name}.{{{sub}}}")
                continue
            out.append(f"  {name}.{f.name}={default!r}" + (f"  -- {docs[f.name]}" if docs.get(f.name) else ""))
    out += ["", "Hydra's own help: engram-train --hydra-help"]
    return "\n".join(out)


#: Hydra flags that only compose or describe the config: answered without importing torch or Megatron, so
#: shell completion (one call per Tab) and ``--cfg job`` take about a second instead of ~16 s.
COMPOSE_ONLY = ("-sc", "--shell-completion", "-c", "--cfg", "-i", "--info", "--hydra-help", "-p", "--package")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def compose_only(dict_cfg) -> None:
    """The trainer's config entry point (same config path and name) without the trainer: Hydra answers
    ``COMPOSE_ONLY`` flags itself and never calls this."""
    raise RuntimeError("engram-train: compose_only ran a task; use engram_train.train.main to train")


def answered_without_training() -> bool:
    """Answer ``--help`` and the ``COMPOSE_ONLY`` flags of this command line; False when it asks to train."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(help_text())
        return True
    if any(arg.split("=")[0] in COMPOSE_ONLY for arg in sys.argv[1:]):
        compose_only()
        return True
    return False
