"""GGUF import: the SmolLM2-135M-Instruct GGUF loads into our Transformer with the right shape, predicts real
English well (and clearly worse with llama.cpp's q/k permutation undone, which proves the RoPE convention),
matches transformers' LlamaForCausalLM, answers a chat question; tiny written GGUFs round-trip and bad ones
name the problem; load_any takes every kind of model spec; `model import` reads a .gguf."""

import contextlib
import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli_json
from mobilellm_r1.config import model_preset
from mobilellm_r1.model import Transformer
from mobilellm_r1.model.generate import generate
from mobilellm_r1.model.gguf import gguf_name, load_any, load_gguf, to_half_split
from mobilellm_r1.model.hf import export_hf
from mobilellm_r1.model.io import CheckpointError, load_model, save_model

gguf = pytest.importorskip("gguf")

# Ordinary English prose (written for this test), 252 SmolLM2 tokens.
PROSE = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night, the keeper "
    "climbed the narrow stairs to light the lamp, so that ships passing through the dark water would know where "
    "the rocks were. In the morning he wrote a short note in his logbook about the weather, the wind and the boats "
    "he had seen. Most days were quiet, but in winter the storms came quickly from the north, and the waves "
    "crashed against the stones below. The people in the village depended on the light, and they often brought "
    "the keeper bread, fish and news from the town. When the lighthouse was finally replaced by an automatic "
    "beacon, the keeper moved into a small house near the harbour. He still walked up the hill every evening to "
    "watch the beam sweep across the sea, and he told the children stories about the ships he had guided home. "
    "Today the building is a small museum, and visitors can climb the same stairs and read the pages of his "
    "logbook, which describe a life of patience, duty and simple routine. Many of them say that the view from the "
    "top is worth the climb, especially on a clear day when you can see the islands on the horizon and the fishing "
    "boats returning to the harbour in the late afternoon."
)


@pytest.fixture(scope="module")
def smollm2_path():
    from mobilellm_r1.assets import smollm2_gguf

    try:
        return smollm2_gguf(fetch=False)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    t0 = time.perf_counter()
    model, meta = load_gguf(smollm2_path)
    meta["load_s"] = time.perf_counter() - t0
    return model, meta


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from mobilellm_r1.tokenizer import load_tokenizer

    return load_tokenizer("smollm2")


def mean_nll(model: Transformer, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits[0, :-1].float(), x[0, 1:]).item()


@contextlib.contextmanager
def half_split_qk(model: Transformer):
    """The model with llama.cpp's q/k permutation undone (HF's row order) inside the block; wrong for our
    interleaved RoPE. The stored rows are restored afterwards (no copy of the whole model)."""
    saved = []
    with torch.no_grad():
        for blk in model.layers:
            a = blk.self_attn
            for lin, heads in ((a.q_proj, a.n_heads), (a.k_proj, a.n_kv_heads)):
                saved.append((lin.weight, lin.weight.clone()))
                lin.weight.copy_(to_half_split(lin.weight, heads))
    try:
        yield model
    finally:
        with torch.no_grad():
            for w, orig in saved:
                w.copy_(orig)


# ------------------------------------------------------------------------------------- the real GGUF


def test_smollm2_config_and_params(smollm2):
    model, meta = smollm2
    cfg = model.cfg
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.ffn_dim, cfg.max_seq_len) == (49152, 1536, 8192)
    assert cfg.tie_embeddings and model.lm_head is None and not cfg.qk_norm and not cfg.weight_sharing
    assert cfg.rope_theta == 100000.0 and abs(cfg.norm_eps - 1e-5) < 1e-9
    # <|im_start|> bos, <|im_end|> eos and pad from the GGUF, plus <|endoftext|> (id 0) as a stop token
    assert (cfg.bos_id, cfg.eos_ids, cfg.pad_id) == (1, [0, 2], 2)
    assert model.param_count() == cfg.param_count() == 134_515_008
    assert meta["tokenizer"] == "smollm2" and meta["arch"] == "llama" and meta["format"] == "gguf"
    assert meta["source"].endswith(".gguf") and meta["config"] == cfg
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
    assert meta["load_s"] < 30, meta["load_s"]  # about 4 s here (GGUF metadata parse ~3 s, dequantize <1 s)


def test_smollm2_english_nll_and_rope_convention(smollm2, tok):
    model, _ = smollm2
    ids = tok.encode(PROSE)
    assert 200 <= len(ids) <= 400, len(ids)
    stored = mean_nll(model, ids)
    with half_split_qk(model):
        unpermuted = mean_nll(model, ids)
    assert mean_nll(model, ids) == stored  # restored
    # Measured here: 2.99 nats with the stored q/k rows, 4.87 with the permutation undone.
    assert stored < 3.5, stored
    assert unpermuted > stored + 1.0, (stored, unpermuted)


def test_smollm2_matches_transformers_llama(smollm2):
    """transformers' LlamaForCausalLM (rotate_half RoPE) on HF-ordered q/k rows computes what our decoder
    (interleaved RoPE) computes on the GGUF's stored rows."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model, _ = smollm2
    c = model.cfg
    hc = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hc)
    state = {}
    for k, v in model.state_dict().items():
        if ".q_proj." in k:
            v = to_half_split(v, c.n_heads)
        elif ".k_proj." in k:
            v = to_half_split(v, c.n_kv_heads)
        state["model." + k.replace("feed_forward", "mlp")] = v
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = LlamaRotaryEmbedding(hc)  # its buffers were built on the meta device
    hf.eval()
    ids = torch.randint(0, c.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3


def test_smollm2_answers_chat_question(smollm2, tok):
    model, _ = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    res = generate(model, [prompt], 24, stop_token_ids=tok.eos_ids)
    text = tok.decode(res.token_ids[0])
    # Measured: "The capital of France is Paris.<|im_end|>"
    assert "Paris" in text, text
    assert res.finish_reasons[0] == "stop_token"


# ------------------------------------------------------------------------------------ written GGUFs


def tiny_cfg(**kw):
    base = dict(vocab_size=300, bos_id=1, eos_ids=[2], pad_id=2, max_seq_len=128, qk_norm=False, init_std=0.05,
                rope_theta=10000.0)
    return model_preset("micro", **{**base, **kw})


def write_gguf(path, model: Transformer, *, arch="llama", tokens=True, pad=True, drop=(), reshape=None,
               dtype=np.float32):
    """A GGUF holding ``model`` the way convert_hf_to_gguf writes a llama (names, metadata, numpy order)."""
    c = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    if tokens:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    else:
        w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(c.bos_id)
    w.add_eos_token_id(c.eos_ids[0])
    if pad:
        w.add_pad_token_id(c.pad_id)
    for name, p in model.named_parameters():
        g = gguf_name(name)
        if g in drop:
            continue
        arr = p.detach().numpy().astype(dtype if p.dim() == 2 else np.float32)
        if reshape and g == reshape:
            arr = arr[:-1]
        w.add_tensor(g, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kw,dtype,tol", [({}, np.float32, 1e-5),
                                          ({"tie_embeddings": False}, np.float16, 5e-2)])
def test_written_gguf_round_trip(tmp_path, kw, dtype, tol):
    torch.manual_seed(0)
    src = Transformer(tiny_cfg(**kw)).eval()
    path = write_gguf(tmp_path / "tiny.gguf", src, dtype=dtype)
    model, meta = load_gguf(path)
    c = model.cfg
    assert (c.vocab_size, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim) == (300, 4, 128, 2, 1, 384)
    assert c.tie_embeddings == src.cfg.tie_embeddings and (model.lm_head is None) == c.tie_embeddings
    assert (c.bos_id, c.eos_ids, c.pad_id) == (1, [2], 2) and not c.qk_norm
    assert meta["tokenizer"] == str(path.resolve()) and meta["source"] == str(path) and meta["arch"] == "llama"
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - src(ids)).abs().max().item() < tol
    bf, _ = load_gguf(path, dtype=torch.bfloat16)
    assert bf.embed_tokens.weight.dtype == torch.bfloat16


def test_written_gguf_defaults(tmp_path):
    """No token list: vocab from llama.vocab_size; no padding id: pad = eos."""
    torch.manual_seed(0)
    src = Transformer(tiny_cfg(pad_id=0)).eval()
    model, _ = load_gguf(write_gguf(tmp_path / "t.gguf", src, tokens=False, pad=False))
    assert model.cfg.vocab_size == 300 and model.cfg.pad_id == 2


def test_bad_gguf_errors(tmp_path):
    torch.manual_seed(0)
    src = Transformer(tiny_cfg()).eval()
    with pytest.raises(CheckpointError, match=r"missing tensor 'blk\.1\.ffn_up\.weight'"):
        load_gguf(write_gguf(tmp_path / "a.gguf", src, drop=("blk.1.ffn_up.weight",)))
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.attn_k\.weight' has shape \[63, 128\]"):
        load_gguf(write_gguf(tmp_path / "b.gguf", src, reshape="blk.0.attn_k.weight"))
    with pytest.raises(CheckpointError, match=r"architecture 'gpt2' is not supported"):
        load_gguf(write_gguf(tmp_path / "c.gguf", src, arch="gpt2"))
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        load_gguf(tmp_path / "nope.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_gguf(tmp_path / "junk.gguf")


# ------------------------------------------------------------------------------------------ load_any


def test_load_any_every_kind(tmp_path):
    torch.manual_seed(0)
    src = Transformer(tiny_cfg(qk_norm=True)).eval()
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = src(ids)

    ckpt = save_model(tmp_path / "ckpt", src, tokenizer_spec="smollm2")
    m, meta = load_any(ckpt)
    assert meta["arch"] == "mobilellm-r1" and meta["tokenizer"] == "smollm2" and meta["source"] == str(ckpt)
    assert torch.equal(m(ids), want)
    m, _ = load_any(str(ckpt), dtype=torch.bfloat16)
    assert m.embed_tokens.weight.dtype == torch.bfloat16

    hf_dir = export_hf(src, tmp_path / "hf")
    m, meta = load_any(hf_dir)
    assert meta["arch"] == "llama4_text" and meta["format"] == "hf" and meta["tokenizer"] == ""
    assert meta["config"].qk_norm and torch.equal(m(ids), want)

    plain = Transformer(tiny_cfg()).eval()
    path = write_gguf(tmp_path / "tiny.gguf", plain)
    m, meta = load_any(str(path))
    assert meta["format"] == "gguf" and meta["tokenizer"] == str(path.resolve())
    with torch.no_grad():
        assert torch.allclose(m(ids), plain(ids), atol=1e-5)


def test_load_any_smollm2(smollm2_path):
    m, meta = load_any("smollm2")
    assert meta["tokenizer"] == "smollm2" and m.cfg.n_layers == 30 and m.embed_tokens.weight.dtype == torch.float32


def test_load_any_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found: expected 'smollm2', a .gguf file"):
        load_any(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model"):
        load_any(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a model"):
        load_any(tmp_path / "notes.txt")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported model.*'gpt2'"):
        load_any(other)


def test_cli_import_gguf(tmp_path):
    torch.manual_seed(0)
    src = Transformer(tiny_cfg()).eval()
    path = write_gguf(tmp_path / "tiny.gguf", src)
    res = run_cli_json("model", "import", path, "--out", tmp_path / "ck")
    assert res["n_layers"] == 4 and res["tokenizer"] == str(path.resolve()) and res["dtype"] == "float32"
    m, meta = load_model(tmp_path / "ck")
    assert meta["tokenizer"] == str(path.resolve()) and not m.cfg.qk_norm
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(m(ids), src(ids), atol=1e-5)
