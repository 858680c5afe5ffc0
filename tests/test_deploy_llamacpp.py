"""llama.cpp on our GGUF export: the Llama-3 vocabulary written as a GGUF tokenizer, our qwen3 graph run by
llama.cpp itself (the ``deploy`` extra's cyllama bindings), and llama.cpp's row of the deploy benchmark."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from mobilellm_r1.config import model_preset
from mobilellm_r1.model.transformer import Transformer

pytest.importorskip("gguf")

from mobilellm_r1.deploy import DeployConfig  # noqa: E402
from mobilellm_r1.deploy.export import bpe_merges, export_gguf  # noqa: E402

needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("cyllama") is None,
                                    reason="cyllama (llama.cpp bindings, the deploy extra) is not installed")

TEXTS = ["Hello world! The quick brown fox's   spaces\n\nnew lines",
         "ünïcödé 你好, don't 1234567 + 89 = 1234656; x**2 \\boxed{42}",
         "    def f(x):\n        return x  # tabs\tand  trailing   ",
         "<|begin_of_text|> is text here, not the special token"]


def _micro(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_preset("micro", **kw)).eval()


def _bpe(word: bytes, rank: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """Plain priority BPE over a merge list (what llama.cpp does with a GGUF's merges)."""
    parts = [word[i:i + 1] for i in range(len(word))]
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: rank.get((parts[i], parts[i + 1]), 1 << 60))
        if (parts[best], parts[best + 1]) not in rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def test_merges_recovered_from_ranks_tokenize_like_tiktoken():
    """tiktoken files hold ranks only; the merges we derive for a GGUF must split every word as tiktoken
    does (checked on Llama-3's real ranks, over words of real text and random byte strings)."""
    import tiktoken

    from mobilellm_r1.assets import llama3_tokenizer_model
    from mobilellm_r1.tokenizer import _read_tiktoken_ranks

    ranks = _read_tiktoken_ranks(llama3_tokenizer_model())
    merges = bpe_merges(ranks)
    assert len(merges) > len(ranks) - 256  # at least one merge for every multi-byte token
    assert all(a + b in ranks for a, b in merges[:1000])
    order = {m: i for i, m in enumerate(merges)}
    # one pre-token per string: the whole string is BPE'd, as llama.cpp does each of its pre-tokens
    enc = tiktoken.Encoding("t", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={})
    rng = random.Random(0)
    words = [w for t in TEXTS for w in t.split()]
    glued = (b"".join(rng.sample(list(ranks), 3)) for _ in range(2000))  # merges across token boundaries
    words += [g.decode() for g in glued if _utf8(g)][:300]
    assert len(words) > 300
    for w in words:
        want = [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(w)]
        assert _bpe(w.encode(), order) == want, w


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory):
    """A 1-layer model at the paper's 128,256-id vocabulary, as a q4_0 GGUF with Llama-3's tokenizer."""
    from mobilellm_r1.model.io import save_model

    m = _micro(n_layers=1)
    d = tmp_path_factory.mktemp("l3")
    export_gguf(m, d / "m.gguf", "llama3", dtype="q4_0")
    save_model(d / "ckpt", m)  # the benchmark reads the configuration from here, not from the GGUF
    return d / "m.gguf"


@needs_llamacpp
def test_llama3_gguf_tokenizes_like_our_tokenizer_in_llama_cpp(llama3_gguf):
    from cyllama.llama import llama_cpp as cy

    from mobilellm_r1.tokenizer import load_tokenizer

    cy.disable_logging()
    model = cy.LlamaModel(str(llama3_gguf), cy.LlamaModelParams())
    vocab = model.get_vocab()
    assert vocab.n_vocab == 128256 and vocab.token_bos() == 128000 and vocab.is_eog(128009)
    tok = load_tokenizer("llama3")
    for t in TEXTS:
        assert list(vocab.tokenize(t, add_special=True, parse_special=False)) == tok.encode(t, bos=True), t


def _llama_cpp_greedy(path, prompt: list[int], n: int) -> list[int]:
    from cyllama.llama import llama_cpp as cy

    cy.disable_logging()
    model = cy.LlamaModel(str(path), cy.LlamaModelParams())
    cp = cy.LlamaContextParams()
    cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 128, 64, 1, 1
    cp.type_k = cp.type_v = 0  # GGML_TYPE_F32: an f16 cache would round what our fp32 model keeps
    ctx = cy.LlamaContext(model, cp)
    s = cy.LlamaSampler(cy.LlamaSamplerChainParams())
    s.add_greedy()
    ctx.decode(cy.llama_batch_get_one(prompt, 0))
    out = [s.sample(ctx, -1)]
    for i in range(n - 1):
        ctx.decode(cy.llama_batch_get_one([out[-1]], len(prompt) + i))
        out.append(s.sample(ctx, -1))
    return out


@needs_llamacpp
@pytest.mark.parametrize("qk_norm", [True, False])
def test_llama_cpp_generates_our_greedy_tokens_on_the_f32_export(tmp_path, qk_norm):
    """Our decoder as llama.cpp's qwen3 graph (QK-norm: unit norms, half-split q/k rows) or llama graph:
    llama.cpp's greedy continuation equals ours. Weights scaled up so the argmax is never a near-tie."""
    from mobilellm_r1.model.generate import generate

    m = _micro(n_layers=2, vocab_size=128256, qk_norm=qk_norm, init_std=0.08)
    export_gguf(m, tmp_path / "m.gguf", "llama3", dtype="f32")
    prompt = torch.randint(0, 128000, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = generate(m, [prompt], 16, stop_token_ids=[]).token_ids[0]
    assert _llama_cpp_greedy(tmp_path / "m.gguf", prompt, 16) == ours


@needs_llamacpp
def test_bench_llama_cpp_row(llama3_gguf, tmp_path, monkeypatch):
    from mobilellm_r1.deploy import bench as B

    cfg = DeployConfig(contexts=[48, 96], new_tokens=8, threads=1, runtimes=["llamacpp_q4_0"])
    res = B.bench(llama3_gguf.parent / "ckpt", None, cfg, gguf=llama3_gguf)
    rows = res["runtimes"]["llamacpp_q4_0"]["rows"]
    assert [r["context"] for r in rows] == [48, 96]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and 0 < r["roofline_fraction"]
        assert r["weight_bytes_per_token"] == B.q4_0_bytes_per_token(model_preset("micro", n_layers=1))
        assert r["kv_bytes_per_token"] == r["context"] * B.kv_bytes_per_position(model_preset("micro", n_layers=1), 2)
    assert "| llamacpp_q4_0 |" in res["table"] and "time to first token" in res["table"]
    monkeypatch.setattr(B, "llamacpp_available", lambda: False)
    res = B.bench(llama3_gguf.parent / "ckpt", None, cfg, gguf=llama3_gguf)
    assert [r["status"] for r in res["runtimes"]["llamacpp_q4_0"]["rows"]] == [B.LLAMACPP_MISSING] * 2


def _llama_bench() -> str | None:
    """A llama-bench binary of a native llama.cpp build: $MOBILELLM_LLAMA_BENCH, or on the PATH."""
    import os
    import shutil

    return os.environ.get("MOBILELLM_LLAMA_BENCH") or shutil.which("llama-bench")


def test_native_llama_cpp_row_is_skipped_without_a_binary(llama3_gguf, tmp_path):
    from mobilellm_r1.deploy import bench as B

    cfg = DeployConfig(contexts=[48], new_tokens=8, runtimes=["llamacpp_native"], llama_bench=str(tmp_path / "none"))
    row = B.bench(llama3_gguf.parent / "ckpt", None, cfg, gguf=llama3_gguf)["runtimes"]["llamacpp_native"]["rows"][0]
    assert row["status"].startswith("skipped: no llama-bench binary")


@pytest.mark.skipif(_llama_bench() is None, reason="no llama-bench (set MOBILELLM_LLAMA_BENCH to a llama.cpp build)")
def test_native_llama_cpp_row(llama3_gguf):
    from mobilellm_r1.deploy import bench as B

    cfg = DeployConfig(contexts=[48, 96], new_tokens=8, rounds=2, runtimes=["llamacpp_native"],
                       llama_bench=_llama_bench())
    res = B.bench(llama3_gguf.parent / "ckpt", None, cfg, gguf=llama3_gguf)
    for r in res["runtimes"]["llamacpp_native"]["rows"]:
        assert r["status"] == "ok", r
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and 0 < r["roofline_fraction"]
        assert r["ttft_s"] == pytest.approx((r["context"] - 8) / r["prefill_tok_s"] + 1 / r["decode_tok_s"])
