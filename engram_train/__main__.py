"""``python -m engram_train`` is the ``engram-train`` command."""

from engram_train.cli import main

main()
