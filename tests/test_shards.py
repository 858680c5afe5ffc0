import json

import numpy as np
import pytest

from conftest import run_cli, run_cli_json
from mobilellm_r1.data.shards import ShardSet, TokenizeOptions, tokenize_sources
from mobilellm_r1.tokenizer import load_tokenizer


def _write(path, texts, extra=b""):
    path.write_bytes(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts) + extra)


def test_tokenize_cli_writes_shards_and_doc_index(tmp_path):
    web = ["Hello world", "The cat sat on the mat.", "Ünïcödé text ✓"]
    math = ["1 + 1 = 2", "x^2 - 1 = (x - 1)(x + 1)"]
    _write(tmp_path / "web.jsonl", web, b'{"text": ""}\nnot json\n{"text": "bad \xff"}\n')
    _write(tmp_path / "math.jsonl", math)
    out = run_cli_json("data", "tokenize", "--tokenizer", "llama3", "--input", tmp_path / "web.jsonl",
                       tmp_path / "math.jsonl", "--out", tmp_path / "shards", "--workers", "2")
    assert out["dtype"] == "uint32" and out["tokens_per_s"] > 0
    assert out["sources"]["web"]["docs"] == 3 and out["sources"]["web"]["skipped"] == 3
    assert (out["sources"]["web"]["empty"], out["sources"]["web"]["malformed"],
            out["sources"]["web"]["invalid_utf8"]) == (1, 1, 1)

    tok = load_tokenizer("llama3")
    ss = ShardSet(tmp_path / "shards")
    for name, texts in (("web", web), ("math", math)):
        expected = [tok.encode(t, bos=True, eos=True) for t in texts]
        stream = ss.tokens(name, 0, ss.n_tokens(name)).tolist()
        assert stream == [i for e in expected for i in e]
        starts = ss.doc_starts(name).tolist()
        assert starts == list(np.cumsum([0] + [len(e) for e in expected[:-1]]))
    assert out["tokens"] == sum(ss.n_tokens(s) for s in ss.sources)


def test_small_vocab_gives_uint16_and_multiple_shards(tmp_path):
    texts = [f"document number {i} with some words in it" for i in range(200)]
    _write(tmp_path / "a.jsonl", texts)
    index = tokenize_sources({"a": [str(tmp_path / "a.jsonl")]}, tmp_path / "s",
                             TokenizeOptions(tokenizer="smollm2", workers=1, shard_tokens=500, batch_docs=16,
                                                             progress=False))
    meta = index["sources"]["a"]
    assert index["dtype"] == "uint16" and len(meta["shards"]) > 2
    ss = ShardSet(tmp_path / "s")
    assert ss.tokens("a", 0, ss.n_tokens("a")).dtype == np.uint16
    tok = load_tokenizer("smollm2")
    flat = [i for t in texts for i in tok.encode(t, bos=True, eos=True)]
    assert ss.tokens("a", 0, len(flat)).tolist() == flat
    # a read that crosses shard boundaries
    s0 = meta["shards"][0]["n_tokens"]
    assert ss.tokens("a", s0 - 3, 10).tolist() == flat[s0 - 3:s0 + 7]
    with pytest.raises(IndexError):
        ss.tokens("a", len(flat) - 2, 5)


def test_adding_a_source_keeps_others_and_rejects_other_tokenizer(tmp_path):
    _write(tmp_path / "a.jsonl", ["alpha"])
    _write(tmp_path / "b.jsonl", ["beta"])
    tokenize_sources({"a": [str(tmp_path / "a.jsonl")]}, tmp_path / "s", TokenizeOptions(workers=1, progress=False))
    tokenize_sources({"b": [str(tmp_path / "b.jsonl")]}, tmp_path / "s", TokenizeOptions(workers=1, progress=False))
    assert ShardSet(tmp_path / "s").sources == ["a", "b"]
    res = run_cli("data", "tokenize", "--tokenizer", "smollm2", "--input", tmp_path / "a.jsonl",
                  "--out", tmp_path / "s", check=False)
    assert res.returncode == 2 and "holds shards of tokenizer 'llama3'" in res.stderr
    assert not list((tmp_path / "s").glob(".tmp-*"))


def test_missing_input_fails_cleanly(tmp_path):
    res = run_cli("data", "tokenize", "--input", tmp_path / "nope.jsonl", "--out", tmp_path / "s", check=False)
    assert res.returncode == 2 and "input not found" in res.stderr and "Traceback" not in res.stderr


def test_max_docs_keeps_the_first_documents_of_each_source(tmp_path):
    texts = [f"Document number {i} of the web source." for i in range(7)]
    _write(tmp_path / "web.jsonl", texts)
    _write(tmp_path / "math.jsonl", ["1 + 1 = 2", "2 + 2 = 4"])
    index = tokenize_sources({"web": [str(tmp_path / "web.jsonl")], "math": [str(tmp_path / "math.jsonl")]},
                             tmp_path / "shards", TokenizeOptions(tokenizer="llama3", workers=1, progress=False,
                                                                 max_docs=3))
    assert index["sources"]["web"]["docs"] == 3 and index["sources"]["math"]["docs"] == 2
    assert index["sources"]["web"]["max_docs"] == 3
    tok = load_tokenizer("llama3")
    ss = ShardSet(tmp_path / "shards")
    assert ss.tokens("web", 0, ss.n_tokens("web")).tolist() == [i for t in texts[:3] for i in tok.encode(t, bos=True, eos=True)]
