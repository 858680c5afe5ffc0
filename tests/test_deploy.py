"""Deploy: 8da4w quantization, the static-cache export module, the XNNPACK .pte, GGUF, the benchmark.

One quantized .pte of a 1-layer micro model is exported per session (~10 s of lowering); the fp32 .pte
and the CLI end to end are slow tests.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch

from mobilellm_r1.config import ConfigError, load_recipe, model_preset, recipe_from_dict
from mobilellm_r1.model.io import CheckpointError
from mobilellm_r1.model.transformer import Transformer

pytest.importorskip("executorch")
pytest.importorskip("torchao")
warnings.filterwarnings("ignore")

from mobilellm_r1.deploy import DeployConfig  # noqa: E402
from mobilellm_r1.deploy.bench import kv_bytes_per_position, table, weight_bytes_per_token  # noqa: E402
from mobilellm_r1.deploy.export import PteRunner, StaticCacheLM, export_executorch, export_gguf  # noqa: E402
from mobilellm_r1.deploy.quantize import (GroupSizeError, auto_group_size, load_quantized, quantize_model,  # noqa: E402
                                          save_quantized)


def _micro(n_layers: int = 1, seed: int = 0, vocab_size: int = 512, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_preset("micro", vocab_size=vocab_size, n_layers=n_layers, **kw)).eval()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# ------------------------------------------------------------------------------------------ quantize


def test_group_size_rule_follows_the_paper():
    assert auto_group_size(model_preset("140m")) == 32  # 576 is not a multiple of 128
    assert auto_group_size(model_preset("360m")) == 128
    assert auto_group_size(model_preset("tiny")) == 128


def test_group_size_that_does_not_divide_a_layer_names_it():
    m = _micro(ffn_dim=320)  # down_proj's input 320 is not a multiple of 128
    with pytest.raises(GroupSizeError, match=r"layers\.0\.feed_forward\.down_proj: input size 320"):
        quantize_model(m, group_size=128)
    with pytest.raises(GroupSizeError, match=r"embed_tokens: embedding width 128"):
        quantize_model(_micro(), group_size=32, embedding_group_size=48)


def test_quantize_quantizes_every_linear_and_the_embedding_and_stays_close(tmp_path):
    m = _micro(n_layers=2)
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = m(x)
    s = quantize_model(m, group_size=32)
    names = [n for n, p in m.named_parameters() if hasattr(p, "qdata")]
    assert len(names) == 2 * 7 + 1 + 1 == s["linear_layers"] + 1  # 7 per block, the head, the embedding
    assert "lm_head.weight" in names and "embed_tokens.weight" in names
    assert m.layers[0].self_attn.q_proj.weight.scale.shape == (128, 128 // 32)
    with torch.no_grad():
        out = m(x)
    assert 0.9 < _cos(out, ref) < 0.99999  # quantization changes the logits, but not much
    assert s["quantized_bytes"] < 0.3 * s["fp32_bytes"]
    save_quantized(tmp_path / "q", m, s)
    m2, meta = load_quantized(tmp_path / "q")
    assert meta["quantization"]["group_size"] == 32
    with torch.no_grad():
        assert torch.equal(m2(x), out)
    from mobilellm_r1.model.gguf import load_any

    m3, _ = load_any(tmp_path / "q")  # probe / eval load the fake-quant model like any checkpoint
    with torch.no_grad():
        assert torch.equal(m3(x), out)


# ------------------------------------------------------------------------------------ static-cache module


@pytest.mark.parametrize("sharing", [False, True])
def test_static_cache_module_equals_transformer_forward(sharing):
    m = _micro(n_layers=2, weight_sharing=sharing)
    x = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        ref = m(x)
        lm = StaticCacheLM(copy.deepcopy(m), 64, full_logits=True)
        parts = [lm(x[:, :17], torch.tensor([0]))]
        parts += [lm(x[:, i:i + 1], torch.tensor([i])) for i in range(17, 30)]
    got = torch.cat(parts, dim=1)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ ExecuTorch


@pytest.fixture(scope="module")
def quantized_pte(tmp_path_factory):
    d = tmp_path_factory.mktemp("pte")
    m = _micro(vocab_size=32768)  # a 16 MB fp32 embedding: memory differences between runtimes stand out
    fq = copy.deepcopy(m)
    quantize_model(fq)
    summary = export_executorch(copy.deepcopy(m), d / "m.pte", 48, quantize=True)
    return d / "m.pte", m, fq, summary


def test_quantized_pte_loads_and_matches_fake_quant_eager(quantized_pte):
    pte, m, fq, summary = quantized_pte
    assert summary["quantization"]["group_size"] == 128 and summary["bytes"] == pte.stat().st_size
    assert json.loads((pte.parent / "m.pte.json").read_text())["max_context"] == 48
    x = torch.randint(0, 32768, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, fp = fq(x)[0], m(x)[0]
    r = PteRunner(pte)
    # one per block and one for the head; the dynamic sequence dimension splits 2 more off (4 measured)
    assert r.max_context == 48 and summary["delegates"] <= 4
    got = [r.prefill(x[0, :20].tolist())] + [r.step([int(x[0, i])], i) for i in range(20, 40)]
    got = torch.stack(got)
    want = ref[19:40]
    # XNNPACK's int8 x int4 kernels vs torchao's reference dequant-then-matmul: same integers, different
    # accumulation order and activation rounding at ties.
    err = (got - want).abs().max().item()
    assert err < 0.05 * want.abs().max().item(), err
    assert _cos(got, want) > 0.999
    assert _cos(got, fp[19:40]) < _cos(got, want)  # it is the quantized model, not the fp32 one
    # a fresh decode after a reset position overwrites the cache
    assert torch.allclose(r.prefill(x[0, :20].tolist()), got[0], atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the exported context 48"):
        r.step(1, 48)


@pytest.mark.slow
def test_fp32_pte_matches_eager(tmp_path):
    m = _micro(n_layers=2)
    export_executorch(copy.deepcopy(m), tmp_path / "f.pte", 32, quantize=False)
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        ref = m(x)[0]
    r = PteRunner(tmp_path / "f.pte")
    got = torch.stack([r.prefill(x[0, :10].tolist())] + [r.step([int(x[0, i])], i) for i in range(10, 20)])
    torch.testing.assert_close(got, ref[9:20], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ GGUF


@pytest.mark.slow  # reading SmolLM2's 49k-token vocabulary out of its GGUF takes ~15 s
def test_gguf_round_trip_for_a_model_without_qk_norm(tmp_path):
    from mobilellm_r1.model.gguf import load_gguf

    torch.manual_seed(0)
    m = Transformer(model_preset("micro", vocab_size=49152, qk_norm=False, n_layers=1)).eval()
    export_gguf(m, tmp_path / "m.gguf", "smollm2")
    m2, meta = load_gguf(tmp_path / "m.gguf")
    assert m2.cfg.vocab_size == 49152 and not m2.cfg.qk_norm
    x = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))


@pytest.mark.slow  # reads SmolLM2's 49k-token vocabulary out of its GGUF
def test_gguf_of_a_cut_vocabulary_embeds_the_cut_tokenizer(tmp_path):
    """A model on ``smollm2:1024`` exports with SmolLM2's tokenizer cut the same way: 1024 tokens, only the
    merges that build one of them, and llama.cpp's reading of it (our gguf tokenizer) encodes as the cut."""
    from mobilellm_r1.tokenizer import load_tokenizer

    m = _micro(n_layers=1, vocab_size=1024)
    export_gguf(m, tmp_path / "m.gguf", "smollm2:1024")
    cut, back = load_tokenizer("smollm2:1024"), load_tokenizer(str(tmp_path / "m.gguf"))
    assert back.vocab_size == 1024
    for text in ["Tom has 11 tickets. He finds 15 more tickets.\n11 + 15 = 26", "def f(a, b):\n    return a"]:
        assert back.encode(text) == cut.encode(text)
    with pytest.raises(ValueError, match="has 1024 tokens but"):
        export_gguf(_micro(n_layers=1, vocab_size=512), tmp_path / "bad.gguf", "smollm2:1024")


def _tokenizer_gguf(path, n: int) -> str:
    """A GGUF holding only a ``gpt2``-style tokenizer of ``n`` tokens (what export_gguf embeds)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", *(f"t{i}" for i in range(3, n))])
    w.add_token_types([1] * n)
    w.add_token_merges(["a b"])  # llama.cpp refuses a BPE vocabulary without merges
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_qk_norm_model_exports_as_qwen3_and_round_trips(tmp_path):
    import gguf

    from mobilellm_r1.model.gguf import load_gguf, to_half_split, to_interleaved

    m = _micro(n_layers=2, vocab_size=512)
    assert m.cfg.qk_norm
    tok = _tokenizer_gguf(tmp_path / "tok.gguf", 512)
    x = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)
    f32 = export_gguf(m, tmp_path / "m.gguf", tok, dtype="f32")
    assert f32["arch"] == "qwen3"
    m2, meta = load_gguf(tmp_path / "m.gguf")
    assert meta["arch"] == "qwen3" and m2.cfg.qk_norm and m2.cfg.n_kv_heads == m.cfg.n_kv_heads
    with torch.no_grad():
        torch.testing.assert_close(m2(x), ref)  # half-split q/k rows and unit norms read back exactly
    # the stored rows really are half-split: the file's q rows are not ours
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    q0 = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    stored = torch.from_numpy(q0.data.copy()).reshape(m.cfg.n_heads * m.cfg.head_dim, m.cfg.dim)
    ours = m.layers[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(stored, ours) and torch.equal(stored[1], ours[2]) and torch.equal(stored[32], ours[1])

    q4 = export_gguf(m, tmp_path / "q.gguf", tok, dtype="q4_0")
    assert q4["bytes"] < 0.2 * f32["bytes"]  # 4.5 bits per weight, embedding included
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.1.attn_q_norm.weight"] == gguf.GGMLQuantizationType.F32
    mq, _ = load_gguf(tmp_path / "q.gguf")
    for ours, back in ((m.embed_tokens.weight, mq.embed_tokens.weight),
                       (m.layers[1].self_attn.k_proj.weight, mq.layers[1].self_attn.k_proj.weight)):
        a = ours.detach().numpy()  # the embedding as is; k rows permuted both ways around the quantizer
        if ours.shape[0] != 512:
            a = to_half_split(ours.detach(), m.cfg.n_kv_heads).numpy()
        deq = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_0),
                                                      gguf.GGMLQuantizationType.Q4_0).reshape(a.shape))
        if ours.shape[0] != 512:
            deq = to_interleaved(deq, m.cfg.n_kv_heads)
        assert torch.equal(back.detach(), deq)
    with torch.no_grad():  # 4-bit noise on a random-init model (the trained tiny model: cosine 0.99993)
        assert _cos(mq(x), ref) > 0.95

    with pytest.raises(ValueError, match="has 300 tokens but the model's vocabulary is 512"):
        export_gguf(m, tmp_path / "bad.gguf", _tokenizer_gguf(tmp_path / "t300.gguf", 300))
    # a qwen3 file with learned QK-norm weights (a real Qwen3) is refused, not silently normalised away
    rw = gguf.GGUFReader(tmp_path / "m.gguf", "r+")
    next(t for t in rw.tensors if t.name == "blk.1.attn_k_norm.weight").data[:] = 0.5
    rw.data.flush()
    del rw
    with pytest.raises(CheckpointError, match="learned QK-norm weights"):
        load_gguf(tmp_path / "m.gguf")


# ----------------------------------------------------------------------------------- config and bench


def test_deploy_config_from_recipe_is_strict():
    r = recipe_from_dict({"deploy": {"group_size": 32, "contexts": [256, 512]}})
    c = r.section("deploy", DeployConfig)
    assert c.group_size == 32 and c.contexts == [256, 512]
    with pytest.raises(ConfigError, match="unknown key 'grup_size'"):
        recipe_from_dict({"deploy": {"grup_size": 32}}).section("deploy", DeployConfig)
    with pytest.raises(ConfigError, match="runtimes"):
        DeployConfig(runtimes=["tensorrt"])
    assert load_recipe("recipes/tiny.toml").section("deploy", DeployConfig).contexts


def test_byte_accounting_for_the_140m_preset():
    cfg = model_preset("140m")
    assert kv_bytes_per_position(cfg) == 15 * 2 * 3 * 64 * 4
    fp = weight_bytes_per_token(cfg, quantized=False)
    assert abs(fp - 4 * cfg.param_count()) < 4 * cfg.dim * 2  # every weight once (tied head = embedding)
    q = weight_bytes_per_token(cfg, quantized=True)
    assert 0.13 < q / fp < 0.15  # 4 bits + a bf16 scale per 32 weights = 4.5/32 of fp32


def test_bench_workers_measure_every_runtime(quantized_pte, tmp_path):
    from mobilellm_r1.deploy.bench import bench
    from mobilellm_r1.model.io import save_model

    pte, m, _, _ = quantized_pte
    save_model(tmp_path / "ckpt", m)
    cfg = DeployConfig(contexts=[24, 48], new_tokens=8, threads=1, runtimes=["generator_fp32", "executorch_8da4w"])
    res = bench(tmp_path / "ckpt", pte, cfg)  # eager_fp32 runs in the slow CLI test
    assert set(res["runtimes"]) == {"generator_fp32", "executorch_8da4w"}
    for rt, r in res["runtimes"].items():
        assert [row["context"] for row in r["rows"]] == [24, 48]
        for row in r["rows"]:
            assert row["status"] == "ok", row
            assert row["decode_tok_s"] > 0 and 0 < row["roofline_fraction"]
            # three rounds over the same positions, the median reported; bandwidth measured around the cell
            assert len(row["decode_tok_s_rounds"]) == 3 and row["decode_tok_s"] == row["decode_tok_s_rounds"][1]
            assert row["bandwidth"] > 1e8 and row["roofline_tok_s"] == row["bandwidth"] / row["bytes_per_token"]
            # memory is what the run adds over the imported libraries, not the process (nor its parent's) peak
            assert row["baseline_rss_mb"] > 100 and row["peak_rss_mb"] == row["baseline_rss_mb"] + row["mem_mb"]
    mem = {rt: [row["mem_mb"] for row in r["rows"]] for rt, r in res["runtimes"].items()}
    fp32_mb = 4 * m.cfg.param_count() / 2**20
    assert all(v >= 0.9 * fp32_mb for v in mem["generator_fp32"]), (mem, fp32_mb)  # the fp32 weights are resident
    assert max(mem["executorch_8da4w"]) < 0.6 * min(mem["generator_fp32"]), mem  # 4-bit weights
    # the .pte's cache is static (max_context positions, allocated at load): its memory does not grow with context
    assert abs(mem["executorch_8da4w"][1] - mem["executorch_8da4w"][0]) < 3, mem
    assert "| executorch_8da4w |" in res["table"] and "| runtime | 24 | 48 |" in res["table"]
    big = bench(None, pte, DeployConfig(contexts=[64], new_tokens=8, runtimes=["executorch_8da4w"]))
    assert big["runtimes"]["executorch_8da4w"]["rows"][0]["status"].startswith("error: context 64 exceeds")
    oom = bench(tmp_path / "ckpt", None, DeployConfig(contexts=[32], new_tokens=8, memory_limit_gb=0.01,
                                                      runtimes=["eager_fp32"]))
    assert oom["runtimes"]["eager_fp32"]["rows"][0]["status"] == "OOM"
    assert "OOM" in table(oom)


@pytest.mark.slow
def test_cli_quantize_export_bench(tmp_path):
    from mobilellm_r1.model.io import save_model

    save_model(tmp_path / "ckpt", _micro())
    run = lambda *a: subprocess.run([sys.executable, "-m", "mobilellm_r1", *a], capture_output=True,  # noqa: E731
                                    text=True)
    p = run("quantize", str(tmp_path / "ckpt"), "--out", str(tmp_path / "q"), "--group-size", "48", "--json")
    assert p.returncode == 2 and "not divisible by group size 48" in p.stderr
    p = run("quantize", str(tmp_path / "ckpt"), "--out", str(tmp_path / "q"), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["group_size"] == 128
    p = run("export", str(tmp_path / "q"), "--format", "executorch", "--out", str(tmp_path / "m.pte"),
            "--max-context", "64", "--json")
    assert p.returncode == 0, p.stderr
    p = run("bench", str(tmp_path / "m.pte"), "--contexts", "32,64", "--new-tokens", "8", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert set(res["runtimes"]) == {"eager_fp32", "generator_fp32", "executorch_8da4w"}


# ------------------------------------------------------------------------- batched prefill and generate


def test_chunked_prefill_equals_token_by_token(quantized_pte):
    pte, m, fq, summary = quantized_pte
    r = PteRunner(pte)
    assert summary["prefill_chunk"] == 48 and r.prefill_chunk == 48  # the chunk is capped at the context
    x = torch.randint(0, 32768, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    one = r.prefill(x, chunk=1)
    after_one = r.step(7, 37)
    for chunk in (48, 16, 5):
        got = r.prefill(x, chunk=chunk)
        torch.testing.assert_close(got, one, atol=1e-4, rtol=1e-4)
        # the cache written in chunks is the cache written token by token
        torch.testing.assert_close(r.step(7, 37), after_one, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="outside 1..48"):
        r.prefill(x, chunk=49)
    with pytest.raises(ValueError, match="exceeds the exported context 48"):
        r.prefill(x + x)


def test_pte_generate_equals_fake_quant_greedy(quantized_pte):
    pte, m, fq, summary = quantized_pte
    r = PteRunner(pte)
    prompt = torch.randint(0, 32768, (9,), generator=torch.Generator().manual_seed(11)).tolist()
    got = r.generate(prompt, 12, stop_ids=[])
    want, ids = [], list(prompt)
    with torch.no_grad():
        for _ in range(12):  # greedy on the fake-quant eager model, full recompute each step
            t = int(fq(torch.tensor([ids]))[0, -1].argmax())
            want.append(t)
            ids.append(t)
    assert got == want
    streamed = []
    stop = want.index(want[-1]) + 1  # greedy output repeats: the first time the stop id comes
    assert r.generate(prompt, 12, stop_ids=[want[-1]], on_token=streamed.append) == want[:stop] == streamed
    assert r.generate(prompt, 0) == []
    a = r.generate(prompt, 6, stop_ids=[], temperature=1.0, seed=1)
    assert a == r.generate(prompt, 6, stop_ids=[], temperature=1.0, seed=1) and len(a) == 6
    with pytest.raises(FileNotFoundError):
        PteRunner(pte.parent / "missing.pte")


def test_chat_on_a_pte_streams_the_fake_quant_greedy_reply(quantized_pte, tmp_path):
    """`mobilellm-r1 chat model.pte`: the tokenizer comes from the checkpoint the .pte was exported from, the
    reply streams, and it is the fake-quant model's greedy continuation of the chat prompt."""
    import io
    import shutil

    from mobilellm_r1.cli import UserError
    from mobilellm_r1.deploy.export import pte_tokenizer, sidecar
    from mobilellm_r1.model.io import save_model
    from mobilellm_r1.posttrain.chat import ChatOptions, ChatSession

    pte, m, fq, _ = quantized_pte
    save_model(tmp_path / "ck", m, tokenizer_spec="smollm2:32768")
    local = tmp_path / "m.pte"
    shutil.copy(pte, local)
    meta = json.loads(sidecar(pte).read_text())
    sidecar(local).write_text(json.dumps({**meta, "source": str(tmp_path / "ck")}))
    assert pte_tokenizer(local) == "smollm2:32768"
    s = ChatSession(str(local), ChatOptions(max_new_tokens=8))
    out = io.StringIO()
    res = s.reply("What is 2 + 3?", out)
    prompt = s.tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}])
    assert res["prompt_tokens"] == len(prompt) and 1 <= res["new_tokens"] <= 8 and res["ttft_s"] > 0
    want, ids = [], list(prompt)
    with torch.no_grad():
        while len(want) < 8 and (not want or want[-1] not in s.stop):
            want.append(int(fq(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(want[-1])
    assert res["reply"] == s.tok.decode([t for t in want if t not in s.stop]) == out.getvalue()
    sidecar(local).write_text(json.dumps({**meta, "source": ""}))  # no source, not the paper's vocabulary
    with pytest.raises(UserError, match="--tokenizer"):
        ChatSession(str(local), ChatOptions())
    assert ChatSession(str(local), ChatOptions(tokenizer="smollm2:32768")).tok.vocab_size == 32768


def test_pte_profile_benchmark_splits_decode_time_by_op_family(quantized_pte):
    """benchmarks/pte_profile.py: ETDump of the decode steps, per op family (the account of issue 19)."""
    from pathlib import Path

    pte = quantized_pte[0]
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "benchmarks" / "pte_profile.py"), str(pte), "--context", "40",
                        "--new-tokens", "8", "--json"], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYTHONPATH": str(repo / "src"), "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    fams = out["families"]
    assert {"attention", "linear_8da4w"} <= set(fams) and out["decode_tok_s"] > 0
    # the families are the ops inside Method::execute: together no more than it, and most of it
    assert 0.5 * out["ms_per_token"] < sum(f["ms_per_token"] for f in fams.values()) <= 1.001 * out["ms_per_token"]
    assert fams["linear_8da4w"]["achieved_GBps"] > 0 and 0 < fams["attention"]["share"] < 1
