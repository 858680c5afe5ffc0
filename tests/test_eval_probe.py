"""The capability probe: NLL / perplexity on token sets and RankMe (paper Eq. 1 and Eq. 9)."""

import argparse
import importlib
import inspect
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mobilellm_r1.config import model_preset
from mobilellm_r1.data.shards import FORMAT, ShardSet
from mobilellm_r1.eval import probe as P
from mobilellm_r1.model.transformer import Transformer

VOCAB, BOS, EOS = 300, 1, 2


def write_shards(root, sources, vocab=VOCAB, tokenizer="test-fake"):
    """A shard directory by hand: each source's documents (BOS + ids + EOS) split over two shard files, so
    windows cross a shard boundary."""
    index = {"format": FORMAT, "version": 1, "tokenizer": tokenizer, "vocab_size": vocab, "dtype": "uint16",
             "bos_id": BOS, "eos_id": EOS, "sources": {}}
    for name, docs in sources.items():
        d = root / name
        d.mkdir(parents=True)
        docs = [[BOS, *doc, EOS] for doc in docs]
        shards = []
        for i, part in enumerate([docs[: len(docs) // 2], docs[len(docs) // 2:]]):
            flat = np.array([t for doc in part for t in doc], np.uint16)
            (d / f"{i:05d}.bin").write_bytes(flat.tobytes())
            lengths = np.array([len(x) for x in part], np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            np.save(d / f"{i:05d}.idx.npy", np.stack([offsets, lengths], axis=1))
            shards.append({"tokens": f"{i:05d}.bin", "docs": f"{i:05d}.idx.npy", "n_tokens": len(flat),
                           "n_docs": len(part)})
        index["sources"][name] = {"inputs": [], "shards": shards, "tokens": sum(s["n_tokens"] for s in shards),
                                  "docs": len(docs), "stats": {}}
    (root / "index.json").write_text(json.dumps(index))
    return root


def random_docs(rng, n_docs, lo, hi):
    return [rng.integers(3, VOCAB, size=int(rng.integers(lo, hi))).tolist() for _ in range(n_docs)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores, small ops with 2 threads slow down ~100x when other processes
    compete (measured: micro forward 4.5 ms vs 0.5 s; SmolLM2 4x128 tokens 1.9 s vs 10.9 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = write_shards(tmp_path_factory.mktemp("probe") / "shards",
                        {"alpha": random_docs(rng, 12, 5, 60), "beta": random_docs(rng, 6, 20, 90)})
    return ShardSet(root)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    # a large init so predictions depend strongly on the context: a wrong window would show
    return Transformer(model_preset("micro", vocab_size=VOCAB, max_seq_len=64, init_std=0.1)).eval()


# ------------------------------------------------------------------------------------------ RankMe


def test_rankme_counts_the_directions_used():
    g = torch.Generator().manual_seed(0)
    for r in (1, 7, 32):
        q, _ = torch.linalg.qr(torch.randn(500, r, generator=g, dtype=torch.float64))
        assert P.rankme(q) == pytest.approx(r, rel=1e-4)
        # the same r directions inside a wider space: still r
        wide = torch.cat([q, torch.zeros(500, 40, dtype=torch.float64)], dim=1) @ torch.linalg.qr(
            torch.randn(r + 40, r + 40, generator=g, dtype=torch.float64))[0]
        assert P.rankme(wide) == pytest.approx(r, rel=1e-3)
    u, v = torch.randn(300, 1, generator=g), torch.randn(1, 64, generator=g)
    assert P.rankme(u @ v) == pytest.approx(1.0, abs=1e-2)
    x = torch.randn(400, 48, generator=g)
    assert P.rankme(x * 37.5) == pytest.approx(P.rankme(x), rel=1e-6)
    assert P.rankme(x * 1e-3) == pytest.approx(P.rankme(x), rel=1e-6)
    assert 0.8 * 48 < P.rankme(x) < 48  # gaussian rows: nearly full rank, never above the width
    # one dominant direction pulls the effective rank down
    skew = x.clone()
    skew[:, 0] *= 100
    assert P.rankme(skew) < P.rankme(x) / 2
    assert P.rankme(torch.zeros(10, 4)) == 0.0


def test_rankme_gram_route_matches_svd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 96, generator=g) @ torch.diag(torch.logspace(0, -3, 96))
    assert P.singular_values(x, "gram") == pytest.approx(P.singular_values(x, "svd"), rel=1e-4, abs=1e-5)
    assert P.rankme(x, method="gram") == pytest.approx(P.rankme(x, method="svd"), rel=1e-5)
    assert P.rankme(x.T, method="gram") == pytest.approx(P.rankme(x, method="svd"), rel=1e-5)


# ------------------------------------------------------------------------------------ NLL exactness


def naive_windows(n_tok, seq_len, max_tokens):
    """(window starts, first scored target) by the documented rule, written out independently."""
    n_win = (n_tok - 1) // seq_len
    if not max_tokens or max_tokens >= n_win * seq_len:
        return [c * seq_len for c in range(n_win)], 0
    k = max_tokens // seq_len
    if k == 0:
        return [0], seq_len - max_tokens
    return [(i * n_win // k) * seq_len for i in range(k)], 0


def naive_nll(model, shards, source, seq_len, max_tokens=0, doc_mask=False):
    """Full logits + F.cross_entropy, one window at a time."""
    starts, first = naive_windows(shards.n_tokens(source), seq_len, max_tokens)
    doc_starts = set(shards.doc_starts(source).tolist())
    total, count = 0.0, 0
    with torch.no_grad():
        for s in starts:
            toks = torch.from_numpy(shards.tokens(source, s, seq_len + 1).astype(np.int64))[None]
            targets = toks[0, 1:].clone()
            targets[:first] = -100
            doc = None
            if doc_mask:
                new = torch.tensor([i > 0 and (s + i) in doc_starts for i in range(seq_len + 1)])
                doc = new.long().cumsum(0)[None]
                targets[new[1:]] = -100  # a document's first token is not predicted from the previous one
            logits = model(toks[:, :-1], doc_ids=doc[:, :-1] if doc is not None else None)[0]
            total += F.cross_entropy(logits.double(), targets, reduction="sum", ignore_index=-100).item()
            count += int((targets != -100).sum())
    return total, count


@pytest.mark.parametrize("seq_len,max_tokens,doc_mask,batch", [
    (32, 0, False, 3), (32, 0, True, 8), (16, 64, False, 2), (16, 100, True, 4), (40, 25, False, 8),
])
def test_token_nll_equals_full_logits_cross_entropy(toy, micro, seq_len, max_tokens, doc_mask, batch):
    res = P.token_nll(micro, toy, seq_len=seq_len, max_tokens=max_tokens, doc_mask=doc_mask, batch_size=batch)
    tot, cnt = 0.0, 0
    for src in ("alpha", "beta"):
        ref, n = naive_nll(micro, toy, src, seq_len, max_tokens, doc_mask)
        r = res["sources"][src]
        assert r["tokens"] == n > 0
        assert r["nll"] == pytest.approx(ref / n, abs=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(ref / n), rel=1e-5)
        assert r["windows"] == len(naive_windows(toy.n_tokens(src), seq_len, max_tokens)[0])
        assert r["bits_per_byte"] is None  # the fake tokenizer cannot be loaded: no byte counts
        if max_tokens:
            assert n <= max_tokens
        tot, cnt = tot + ref, cnt + n
    assert res["overall"]["nll"] == pytest.approx(tot / cnt, abs=1e-5)
    assert res["overall"]["tokens"] == cnt and res["seq_len"] == seq_len


def test_doc_mask_and_window_choice_change_the_number(toy, micro):
    """The exactness test above would not notice a wrong window if the model ignored context."""
    a = P.token_nll(micro, toy, seq_len=32)["overall"]["nll"]
    b = P.token_nll(micro, toy, seq_len=32, doc_mask=True)["overall"]["nll"]
    c = P.token_nll(micro, toy, seq_len=16)["overall"]["nll"]
    assert abs(a - b) > 1e-3 and abs(a - c) > 1e-3


def test_heldout_windows_are_the_samplers_heldout_chunks(toy, micro):
    from mobilellm_r1.data.mixture import MixtureSampler

    sampler = MixtureSampler.equal(toy, ["beta"], 16, split="heldout", heldout_fraction=0.25)
    starts = set()
    with pytest.raises(StopIteration):
        while True:
            starts.add(sampler.next_row()[3])
    res = P.token_nll(micro, toy, sources=["beta"], seq_len=16, heldout_fraction=0.25)["sources"]["beta"]
    assert res["windows"] == len(starts) == math.ceil(0.25 * ((toy.n_tokens("beta") - 1) // 16))
    ref, n = 0.0, 0
    with torch.no_grad():
        for s in sorted(starts):
            toks = torch.from_numpy(toy.tokens("beta", s, 17).astype(np.int64))[None]
            ref += F.cross_entropy(micro(toks[:, :-1])[0].double(), toks[0, 1:], reduction="sum").item()
            n += 16
    assert res["tokens"] == n and res["nll"] == pytest.approx(ref / n, abs=1e-5)


def test_windows_are_evenly_spaced_and_deterministic():
    idx, first = P.pick_windows(100, 8, 8 * 10)
    assert first == 0 and idx.tolist() == list(range(0, 100, 10))
    idx, first = P.pick_windows(7, 8, 8 * 3)
    assert idx.tolist() == [0, 2, 4]
    assert P.pick_windows(7, 8, 5)[0].tolist() == [0] and P.pick_windows(7, 8, 5)[1] == 3
    assert P.pick_windows(7, 8, 10_000)[0].tolist() == list(range(7))


# ------------------------------------------------------------------------------------------- texts


class ByteTok:
    """A byte tokenizer: id = byte + 3; BOS 1, EOS 2."""

    spec, vocab_size, bos_id, eos_id = "bytes", 259, BOS, EOS

    def encode_batch(self, texts, bos=False, eos=False):
        return [([BOS] if bos else []) + [b + 3 for b in t.encode()] + ([EOS] if eos else []) for t in texts]


def sliding_reference(model, ids, seq_len, stride):
    """Target j (predicting ids[j + 1]) is scored with context from the first window whose span reaches it."""
    total = 0.0
    with torch.no_grad():
        for j in range(len(ids) - 1):
            s = max(0, -(-(j + 1 - seq_len) // stride) * stride)
            logits = model(torch.tensor([ids[s:j + 1]]))[0, -1]
            total -= torch.log_softmax(logits.double(), -1)[ids[j + 1]].item()
    return total, len(ids) - 1


@pytest.mark.parametrize("stride", [None, 8, 24])
def test_text_nll_scores_each_document_with_sliding_windows(micro, stride):
    docs = ["short doc", "a much longer document " * 5, "x", "medium length text here!"]
    res = P.text_nll(micro, ByteTok(), docs, seq_len=24, stride=stride, batch_size=3)
    tot, cnt = 0.0, 0
    for d in docs:
        t, n = sliding_reference(micro, ByteTok().encode_batch([d], bos=True, eos=True)[0], 24, stride or 24)
        tot, cnt = tot + t, cnt + n
    assert res["tokens"] == cnt and res["docs"] == 4
    assert res["nll"] == pytest.approx(tot / cnt, abs=1e-5)
    capped = P.text_nll(micro, ByteTok(), docs, seq_len=24, stride=stride, max_tokens=30)
    assert capped["tokens"] == 30


# --------------------------------------------------------------------------------------- embeddings


def test_output_embeddings_pools(toy, micro):
    seq_len = 16
    n_win = (toy.n_tokens("beta") - 1) // seq_len
    with torch.no_grad():
        rows = torch.stack([torch.from_numpy(toy.tokens("beta", c * seq_len, seq_len).astype(np.int64))
                            for c in range(n_win)])
        hidden = micro(rows, return_hidden=True)
    last = P.output_embeddings(micro, toy, n=10_000, sources=["beta"], pool="last", seq_len=seq_len)
    assert torch.allclose(last, hidden[:, -1], atol=1e-5)
    mean = P.output_embeddings(micro, toy, n=10_000, sources=["beta"], pool="mean", seq_len=seq_len)
    assert torch.allclose(mean, hidden.mean(1), atol=1e-5)
    tok = P.output_embeddings(micro, toy, n=50, sources=["beta"], seq_len=seq_len, seed=3)
    flat = hidden.reshape(-1, hidden.shape[-1])
    assert tok.shape == (50, 128)
    # every sampled vector is one of the hidden states, each at most once
    match = torch.cdist(tok, flat).argmin(1)
    assert torch.allclose(tok, flat[match], atol=1e-5) and len(set(match.tolist())) == 50
    again = P.output_embeddings(micro, toy, n=50, sources=["beta"], seq_len=seq_len, seed=3)
    other = P.output_embeddings(micro, toy, n=50, sources=["beta"], seq_len=seq_len, seed=4)
    assert torch.equal(tok, again) and not torch.equal(tok, other)
    few = P.output_embeddings(micro, toy, n=3, sources=["beta"], pool="last", seq_len=seq_len)
    assert few.shape == (3, 128)
    both = P.output_embeddings(micro, toy, n=40, seq_len=seq_len)  # every source, n each
    assert both.shape == (80, 128)
    r = P.model_rankme(micro, toy, n=300, sources=["beta"], seq_len=seq_len)
    assert r["n"] == 300 and r["dim"] == 128 and 1 < r["rankme"] <= 128
    assert P.model_rankme(micro, toy, n=10_000, seq_len=seq_len)["n"] == \
        len(flat) + (toy.n_tokens("alpha") - 1) // seq_len * seq_len  # every position of both sources
    docs = P.output_embeddings(micro, ["one doc", "another document", "third"], n=8, tokenizer=ByteTok(),
                               pool="mean", seq_len=24)
    assert docs.shape == (3, 128)


# ------------------------------------------------------------------------------------------ errors


def test_bad_input_is_a_clear_error(toy, micro, tmp_path):
    with pytest.raises(ValueError, match=r"'gamma'.*known: alpha, beta"):
        P.token_nll(micro, toy, sources=["alpha", "gamma"], seq_len=16)
    with pytest.raises(ValueError, match="seq_len 65 exceeds the model's max_seq_len 64"):
        P.token_nll(micro, toy, seq_len=65)
    small = Transformer(model_preset("micro", vocab_size=256, max_seq_len=64))
    with pytest.raises(ValueError, match="vocabulary of 300 ids, larger than the model's 256"):
        P.token_nll(small, toy, seq_len=16)
    tiny = write_shards(tmp_path / "tiny", {"t": [[5, 6], [7]]})
    with pytest.raises(ValueError, match="'t' has 7 tokens"):
        P.token_nll(micro, tiny, seq_len=16)
    with pytest.raises(ValueError, match="nothing to probe"):
        P.probe(micro)
    with pytest.raises(ValueError, match="pool"):
        P.probe(micro, shards=toy.root, pool="max")


# ---------------------------------------------------------------------------------------------- CLI


def _parse(argv):
    parser = argparse.ArgumentParser()
    P.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cmd_probe_in_process(toy, micro, tmp_path, capsys):
    from mobilellm_r1.cli import UserError
    from mobilellm_r1.model.io import save_model

    ckpt = save_model(tmp_path / "m", micro)
    args = _parse(["probe", "--model", str(ckpt), "--shards", str(toy.root), "--seq-len", "32",
                   "--rankme-samples", "64", "--device", "cpu", "--json"])
    assert P.cmd_probe(args) == 0
    res = json.loads(capsys.readouterr().out)
    direct = P.token_nll(micro, toy, seq_len=32)
    assert res["overall"]["nll"] == pytest.approx(direct["overall"]["nll"], abs=1e-6)
    assert set(res["sources"]) == {"alpha", "beta"} and res["rankme"]["n"] == 128
    assert res["embedding_rankme"]["n"] == VOCAB and 1 < res["embedding_rankme"]["rankme"] <= 128
    assert P.cmd_probe(_parse(["probe", "--model", str(ckpt), "--shards", str(toy.root), "--seq-len", "32",
                               "--sources", "beta", "--device", "cpu"])) == 0
    assert "beta" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown source 'nope'"):
        P.cmd_probe(_parse(["probe", "--model", str(ckpt), "--shards", str(toy.root), "--sources", "nope"]))
    with pytest.raises(UserError, match="exceeds"):
        P.cmd_probe(_parse(["probe", "--model", str(ckpt), "--shards", str(toy.root), "--seq-len", "999"]))


def _wired():
    from mobilellm_r1 import cli

    return "mobilellm_r1.eval.probe" in cli.COMMAND_MODULES


@pytest.mark.skipif(not _wired(), reason="`probe` is not in mobilellm_r1.cli.COMMAND_MODULES yet")
def test_cli_probe(toy, micro, tmp_path, monkeypatch):
    from conftest import run_cli, run_cli_json
    from mobilellm_r1.model.io import save_model

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt = save_model(tmp_path / "m", micro)
    res = run_cli_json("probe", "--model", ckpt, "--shards", toy.root, "--seq-len", "32", "--max-tokens", "64",
                       "--rankme-samples", "32", "--device", "cpu")
    assert res["sources"]["alpha"]["tokens"] == 64 and res["rankme"]["n"] == 64
    bad = run_cli("probe", "--model", ckpt, "--shards", toy.root, "--sources", "nope", check=False)
    assert bad.returncode == 2 and "alpha, beta" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------- a real model, real text


def _prose_docs():
    """Ordinary English: docstrings of standard-library modules, classes and functions."""
    docs = []
    for name in ("json", "argparse", "collections", "textwrap", "difflib", "functools", "heapq", "random",
                 "statistics", "fractions", "logging", "shutil", "threading", "string"):
        mod = importlib.import_module(name)
        docs += [d for o in [mod, *vars(mod).values()]
                 if (o is mod or ((inspect.isclass(o) or inspect.isfunction(o)) and o.__module__ == name))
                 and (d := inspect.getdoc(o)) and len(d) > 300]
    return docs


@pytest.fixture(scope="module")
def smollm2_prose(tmp_path_factory):
    from mobilellm_r1.assets import smollm2_gguf
    from mobilellm_r1.data.shards import TokenizeOptions, tokenize_sources

    try:
        smollm2_gguf(fetch=False)
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF asset absent (python -m mobilellm_r1.assets fetch)")
    root = tmp_path_factory.mktemp("prose")
    path = root / "prose.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _prose_docs()))
    tokenize_sources({"prose": [str(path)]}, root / "shards", TokenizeOptions(tokenizer="smollm2", workers=1,
                                                                                progress=False))
    return root / "shards"


def test_token_bytes_add_up_to_the_text(smollm2_prose):
    from mobilellm_r1.tokenizer import load_tokenizer

    text = "Naïve café — 12,345 ∑x² ok.\n\tdef f(x): return x  # 数学"
    for spec in ("smollm2", "llama3"):
        tok = load_tokenizer(spec)
        table = P.token_byte_lengths(tok)
        ids = tok.encode(text, bos=True, eos=True)
        assert int(table[ids].sum()) == len(text.encode())


def test_smollm2_on_real_prose_beats_random_init(smollm2_prose):
    from mobilellm_r1.train.loop import load_model_spec

    model, _ = load_model_spec("smollm2")
    res = P.probe(model, shards=smollm2_prose, tokenizer="smollm2", seq_len=128, max_tokens=512,
                  rankme_samples=512, batch_size=4)
    trained = res["sources"]["prose"]
    torch.manual_seed(0)
    rand = Transformer(model.cfg).eval()  # the same shape, random init
    random_nll = P.token_nll(rand, smollm2_prose, seq_len=128, max_tokens=512, batch_size=4)["overall"]
    torch.manual_seed(0)
    tiny = Transformer(model_preset("micro", vocab_size=model.cfg.vocab_size)).eval()
    tiny_nll = P.token_nll(tiny, smollm2_prose, seq_len=128, max_tokens=512, batch_size=4)["overall"]["nll"]
    log_v = math.log(model.cfg.vocab_size)
    print(f"\nSmolLM2-135M on stdlib prose: nll {trained['nll']:.3f} (ppl {trained['ppl']:.1f}, "
          f"{trained['bits_per_byte']:.3f} bits/byte, rankme {trained['rankme']:.1f} of {trained['rankme_n']}); "
          f"random init same shape: nll {random_nll['nll']:.3f}; random micro: nll {tiny_nll:.3f}; "
          f"log V {log_v:.3f}; embedding-matrix rankme {res['embedding_rankme']['rankme']:.1f}")
    assert trained["tokens"] == random_nll["tokens"] == 512
    assert trained["nll"] < 4.5 and trained["nll"] < random_nll["nll"] - 5
    assert 0.3 < trained["bits_per_byte"] < 2.0
    assert abs(random_nll["nll"] - log_v) < 0.5
    assert abs(tiny_nll - log_v) < 0.1
    assert 1 < trained["rankme"] < model.cfg.dim
    assert 1 < res["embedding_rankme"]["rankme"] < model.cfg.dim
