"""Shared fixtures: a small real byte-level BPE, so tests see the id layout production sees."""

from __future__ import annotations

import glob

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"

# Stdlib docstrings rarely shout; these lines make sure "THE" and its relatives earn merges.
_CASE_VARIANTS = ["THE END. The end, the end. Thé THÉ.\nThe THE the\n"] * 200


def _corpus():
    yield from _CASE_VARIANTS
    for path in sorted(glob.glob("/usr/lib/python3.11/*.py"))[:40]:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Tokenizer:
    """Byte-level BPE with ~1000 ids and ``<|endoftext|>``, trained in well under 2 s."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer
