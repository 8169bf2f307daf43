"""N-gram hashing: deterministic, exact in numpy and torch, inside each head's own prime range."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from engram_train.config import EngramConfig
from engram_train.engram.hashing import NgramHasher, is_prime
from engram_train.engram.tokenizer_compression import build_compression_table, eos_token_id

ORDERS, HEADS, ROWS, LAYERS = (2, 3), 4, 101, (1, 3)


@pytest.fixture(scope="module")
def table(bpe_tokenizer):
    return build_compression_table(bpe_tokenizer)


@pytest.fixture(scope="module")
def eos(bpe_tokenizer):
    return eos_token_id(bpe_tokenizer)


@pytest.fixture(scope="module")
def hasher(table, eos):
    return NgramHasher(table, ORDERS, HEADS, ROWS, LAYERS, seed=7, pad_token_id=eos)


@pytest.fixture(scope="module")
def tokens(table):
    return np.random.default_rng(0).integers(0, len(table), size=(3, 40), dtype=np.int64)


def test_same_config_gives_same_ids_and_fingerprint(hasher, table, eos, tokens):
    again = NgramHasher(table, ORDERS, HEADS, ROWS, LAYERS, seed=7, pad_token_id=eos)
    assert np.array_equal(hasher.hash_numpy(tokens), again.hash_numpy(tokens))
    assert hasher.config_fingerprint() == again.config_fingerprint()
    other_seed = NgramHasher(table, ORDERS, HEADS, ROWS, LAYERS, seed=8, pad_token_id=eos)
    assert hasher.config_fingerprint() != other_seed.config_fingerprint()


def test_survives_pickling_for_loader_workers(hasher, tokens):
    clone = pickle.loads(pickle.dumps(hasher))
    assert np.array_equal(clone.hash_numpy(tokens), hasher.hash_numpy(tokens))
    assert torch.equal(clone.hash_torch(torch.from_numpy(tokens)), hasher.hash_torch(torch.from_numpy(tokens)))


@pytest.mark.parametrize("reset", [False, True])
def test_numpy_and_torch_agree_exactly(hasher, tokens, eos, reset):
    x = tokens.copy()
    x[:, [5, 17, 18]] = eos
    boundary = eos if reset else None
    ids = hasher.hash_numpy(x, doc_boundary_token=boundary)
    assert ids.dtype == np.int64
    assert ids.shape == (3, 40, len(LAYERS), len(ORDERS) * HEADS) == (3, 40, hasher.num_layers, hasher.heads_total)
    for dtype in (torch.int64, torch.int32):
        got = hasher.hash_torch(torch.from_numpy(x).to(dtype), doc_boundary_token=boundary)
        assert got.dtype == torch.int64
        assert np.array_equal(got.numpy(), ids)


def test_ids_match_the_demo_formula_position_by_position(hasher, table, tokens):
    ids = hasher.hash_numpy(tokens)
    for b, t in [(0, 0), (1, 1), (2, 39)]:
        for li in range(hasher.num_layers):
            m = [int(v) for v in hasher.multipliers[li]]
            for oi, n in enumerate(ORDERS):
                gram = [int(table[tokens[b, t - k]]) if t - k >= 0 else hasher.pad_id for k in range(n)]
                mix = 0
                for k in range(n):
                    mix ^= gram[k] * m[k]
                for h in range(HEADS):
                    j = oi * HEADS + h
                    expected = int(hasher.row_offsets[li, j]) + mix % int(hasher.head_sizes[li, j])
                    assert ids[b, t, li, j] == expected


def test_every_id_lies_in_its_heads_prime_range(hasher, tokens):
    ids = hasher.hash_numpy(tokens)
    lo = hasher.row_offsets
    assert np.all(ids >= lo) and np.all(ids < lo + hasher.head_sizes)
    for li, (start, end) in enumerate(hasher.layer_row_ranges):
        assert start == lo[li, 0] and end == lo[li, -1] + hasher.head_sizes[li, -1]
        assert np.all((ids[:, :, li] >= start) & (ids[:, :, li] < end))
    assert hasher.layer_row_ranges[0][0] == 0
    assert hasher.num_rows == hasher.layer_row_ranges[-1][1] == int(hasher.head_sizes.sum())


def test_head_sizes_are_distinct_primes_at_or_above_rows_per_head(hasher):
    primes = hasher.head_sizes.reshape(-1).tolist()
    assert hasher.head_sizes.shape == (len(LAYERS), len(ORDERS) * HEADS)
    assert len(set(primes)) == len(primes)
    assert all(is_prime(p) and p >= ROWS for p in primes)
    assert primes[0] == 101 and primes[HEADS] > primes[HEADS - 1]


def test_multipliers_are_odd_and_cannot_overflow(hasher):
    biggest_id = hasher.num_canonical - 1
    for m in hasher.multipliers.reshape(-1).tolist():
        assert m % 2 == 1 and biggest_id * m <= np.iinfo(np.int64).max


def test_layers_hash_differently(hasher, tokens):
    local = hasher.hash_numpy(tokens) - hasher.row_offsets
    assert not np.array_equal(hasher.multipliers[0], hasher.multipliers[1])
    assert np.mean(local[:, :, 0] == local[:, :, 1]) < 0.1


def test_case_variants_of_a_text_hash_identically(hasher, bpe_tokenizer):
    a = np.array([bpe_tokenizer.encode("The THE the").ids])
    b = np.array([bpe_tokenizer.encode("THE The The").ids])
    assert not np.array_equal(a, b)
    assert np.array_equal(hasher.hash_numpy(a), hasher.hash_numpy(b))


def test_doc_boundary_reset_makes_each_document_hash_as_if_alone(hasher, eos, tokens):
    doc1, doc2 = tokens[:1, :10], tokens[:1, 10:20]
    packed = np.concatenate([doc1, [[eos]], doc2], axis=1)
    reset = hasher.hash_numpy(packed, doc_boundary_token=eos)
    plain = hasher.hash_numpy(packed)
    alone = hasher.hash_numpy(doc2)
    assert np.array_equal(reset[:, 11:], alone)
    assert np.array_equal(reset[:, :11], plain[:, :11])
    assert not np.array_equal(plain[:, 11], alone[:, 0])


def test_from_config_reads_the_engram_schema(table, eos):
    cfg = EngramConfig(layers=[0, 2], ngram_orders=[2, 3, 4], heads_per_order=2, rows_per_head=4099, seed=3)
    h = NgramHasher.from_config(cfg, table, pad_token_id=eos)
    assert (h.layers, h.ngram_orders, h.heads_total, h.seed) == ((0, 2), (2, 3, 4), 6, 3)
    assert h.head_sizes.min() >= 4099 and h.multipliers.shape == (2, 4)


def test_rejects_ids_outside_the_vocabulary(hasher, table):
    with pytest.raises(ValueError, match="token ids must lie"):
        hasher.hash_numpy(np.array([[0, len(table)]]))
    with pytest.raises(ValueError, match="token ids must lie"):
        hasher.hash_torch(torch.tensor([[-1, 0]]))


def test_rows_per_head_takes_one_target_per_order(table, eos):
    h = NgramHasher(table, (2, 3), 2, [101, 211], LAYERS, seed=7, pad_token_id=eos)
    assert h.head_sizes.tolist() == [[101, 103, 211, 223], [107, 109, 227, 229]]
    same = NgramHasher(table, (2, 3), 2, 101, LAYERS, seed=7, pad_token_id=eos)
    assert same.head_sizes[0].tolist() == [101, 103, 107, 109]
    with pytest.raises(ValueError, match="one per order"):
        NgramHasher(table, (2, 3), 2, [101], LAYERS, seed=7, pad_token_id=eos)


def test_null_memory_maps_every_ngram_to_its_heads_single_row(table, eos, tokens):
    cfg = EngramConfig(layers=[0, 2], ngram_orders=[2, 3], heads_per_order=4, null_memory=True)
    h = NgramHasher.from_config(cfg, table, pad_token_id=eos)
    assert h.num_rows == 2 * 2 * 4 and h.head_sizes.tolist() == [[1] * 8] * 2
    ids = h.hash_numpy(tokens)
    assert np.array_equal(ids, np.broadcast_to(h.row_offsets, ids.shape))
    assert np.array_equal(h.hash_torch(torch.from_numpy(tokens)).numpy(), ids)
    assert h.config_fingerprint()["null_memory"] is True


@pytest.mark.parametrize(
    "rows,message",
    [([1009], "one target per n-gram order"), ([1009, 1], "every target must be an int >= 2"), (1, "must be an int >= 2")],
)
def test_config_rejects_bad_rows_per_head_in_one_line(rows, message):
    from omegaconf import OmegaConf

    from engram_train.config import ConfigError, to_config

    ok = to_config(OmegaConf.create({"engram": {"rows_per_head": [1009, 2003]}}))
    assert ok.engram.rows_per_head == [1009, 2003] and ok.engram.projection_bias and not ok.engram.null_memory
    with pytest.raises(ConfigError, match=message) as err:
        to_config(OmegaConf.create({"engram": {"rows_per_head": rows}}))
    assert "engram.rows_per_head" in str(err.value) and "\n" not in str(err.value)
