"""Vocabulary compression P: raw token id -> canonical id (DESIGN.md section 3, step 1).

Byte-level BPE spends many ids on spellings of one word ("The", " the", "THE"). Engram hashes
n-grams of canonical ids so those spellings share memory rows; the paper cuts a 128k vocabulary
by ~23% this way. The table equals the one built by ``CompressedTokenizer`` of DeepSeek's released
demo (``engram_demo_v1.py``) id for id; tests/unit/test_engram_demo_parity.py pins it on GPT-2's and
DeepSeek-V3's vocabularies.
"""

from __future__ import annotations

import hashlib

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers

EOS_TOKEN = "<|endoftext|>"
#: Names the rules below; data preparation fingerprints it, so a dataset whose compression.npy was built by
#: other rules is rebuilt rather than reused (a changed table moves every hash id).
COMPRESSION_SCHEME = "demo-v1"

# Holds the single space of a whitespace-only token through Strip, as the released demo does.
_SENTINEL = "\ue000"

_NORMALIZER = normalizers.Sequence(
    [
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        # Only ASCII space, tab, CR and LF collapse, as in the demo: a token of vertical tab, form feed,
        # U+0085 or U+2028 keeps its own id rather than joining the space group.
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ]
)


def canonical_key(tokenizer: Tokenizer, token_id: int) -> str:
    """The string that decides which raw ids share a canonical id.

    A byte-level piece that is not valid UTF-8 on its own decodes to U+FFFD; normalising that would
    merge every such piece into one id, so it keeps its vocabulary string instead. That string lives
    in the same key space as normalised text, as in the demo: the lone byte F0 (vocabulary string
    "ð") shares an id with the decodable token "ð" (27 such merges on DeepSeek-V3's vocabulary).
    """
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" in text:
        return tokenizer.id_to_token(token_id)
    norm = _NORMALIZER.normalize_str(text)
    return norm if norm else text


def build_compression_table(tokenizer: Tokenizer) -> np.ndarray:
    """int64 array of length vocab_size mapping raw id -> canonical id.

    Canonical ids are numbered by first appearance over raw ids 0..V-1, so they are dense in
    [0, V') and the table is a pure function of the tokenizer's vocabulary.
    """
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    key_to_id: dict[str, int] = {}
    table = np.empty(vocab_size, dtype=np.int64)
    for token_id in range(vocab_size):
        key = canonical_key(tokenizer, token_id)
        table[token_id] = key_to_id.setdefault(key, len(key_to_id))
    return table


def num_canonical(table: np.ndarray) -> int:
    """V', the number of canonical ids (they are dense, starting at 0)."""
    return int(table.max()) + 1 if table.size else 0


def table_fingerprint(table: np.ndarray) -> str:
    """sha256 of the table; hash ids (and so a trained table) are only valid for this mapping."""
    data = np.ascontiguousarray(table, dtype="<i8").tobytes()
    return hashlib.sha256(data).hexdigest()


def eos_token_id(tokenizer: Tokenizer) -> int:
    """Raw id of ``<|endoftext|>``, the default n-gram pad and document boundary."""
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(
            f"tokenizer has no {EOS_TOKEN!r} token; Engram pads n-grams with it. "
            f"Train the tokenizer with {EOS_TOKEN!r} as a special token."
        )
    return token_id
