"""Vocabulary compression: spellings of one word share a canonical id; nothing else is lost."""

from __future__ import annotations

import numpy as np
import pytest

from engram_train.engram.tokenizer_compression import (
    build_compression_table,
    eos_token_id,
    num_canonical,
    table_fingerprint,
)


@pytest.fixture(scope="module")
def table(bpe_tokenizer):
    return build_compression_table(bpe_tokenizer)


def ids_of(tokenizer, *tokens):
    ids = [tokenizer.token_to_id(t) for t in tokens]
    assert None not in ids, f"test tokenizer lacks one of {tokens}"
    return ids


def test_case_and_leading_space_variants_share_an_id(bpe_tokenizer, table):
    ids = ids_of(bpe_tokenizer, "The", "Ġthe", "THE", "ĠTHE")
    assert len(set(table[ids].tolist())) == 1
    assert num_canonical(table) < bpe_tokenizer.get_vocab_size()


def test_text_encoded_with_different_case_compresses_identically(bpe_tokenizer, table):
    a = bpe_tokenizer.encode("The the THE").ids
    b = bpe_tokenizer.encode("THE THE the").ids
    assert a != b
    assert table[a].tolist() == table[b].tolist()


def test_table_is_dense_int64_in_first_appearance_order(bpe_tokenizer, table):
    assert table.dtype == np.int64
    assert table.shape == (bpe_tokenizer.get_vocab_size(),)
    _, first_raw = np.unique(table, return_index=True)
    assert np.array_equal(table[np.sort(first_raw)], np.arange(num_canonical(table)))


def test_whitespace_only_tokens_collapse_to_one_space(bpe_tokenizer, table):
    ids = ids_of(bpe_tokenizer, "Ġ", "ĠĠĠ", "Ċ")
    assert len(set(table[ids].tolist())) == 1


def test_partial_utf8_pieces_are_not_merged_with_each_other(bpe_tokenizer, table):
    pieces = [i for i in range(bpe_tokenizer.get_vocab_size()) if "\ufffd" in bpe_tokenizer.decode([i])]
    assert len(pieces) > 10
    assert len(set(table[pieces].tolist())) == len(pieces)


def test_fingerprint_tracks_the_mapping(table):
    assert table_fingerprint(table) == table_fingerprint(table.copy())
    other = table.copy()
    other[[0, 1]] = other[[1, 0]]
    assert table_fingerprint(other) != table_fingerprint(table)


def test_eos_is_its_own_canonical_id(bpe_tokenizer, table):
    eos = eos_token_id(bpe_tokenizer)
    assert np.count_nonzero(table == table[eos]) == 1
