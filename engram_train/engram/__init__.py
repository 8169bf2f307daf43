"""Engram conditional memory, the algorithm alone: vocabulary compression, n-gram hashing, the block."""

from engram_train.engram.hashing import NgramHasher
from engram_train.engram.module import CausalDepthwiseConv1d, EngramBlock
from engram_train.engram.tokenizer_compression import (
    build_compression_table,
    eos_token_id,
    num_canonical,
    table_fingerprint,
)

__all__ = [
    "CausalDepthwiseConv1d",
    "EngramBlock",
    "NgramHasher",
    "build_compression_table",
    "eos_token_id",
    "num_canonical",
    "table_fingerprint",
]
