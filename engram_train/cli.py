"""The ``engram-train`` command: ``--help`` answers from the config schema without importing torch or Megatron
(``engram_train.config_help``); anything else runs the Hydra trainer (``engram_train.train``).

    engram-train experiment=sweep_tiny scaling.allocation_ratio=0.6     # same as python -m engram_train.train
    engram-train --help                                                   # groups, presets and every field's doc
    engram-train -sc install=bash                                         # Hydra's shell completion
"""

from __future__ import annotations

from engram_train.config_help import answered_without_training


def main() -> None:
    if answered_without_training():
        return
    from engram_train.metrics import use_own_wandb_service
    from engram_train.train import main as train_main  # torch, Megatron: only when training

    use_own_wandb_service()
    train_main()


if __name__ == "__main__":
    main()
