"""The decoder: preset sizes, options (weight sharing, document masking, long context), KV cache, IO, CLI."""

import json

import pytest
import torch

from conftest import run_cli_json
from mobilellm_r1.config import ModelConfig, model_preset
from mobilellm_r1.model import Transformer, long_context_config
from mobilellm_r1.model.io import CheckpointError, load_model, read_meta, save_model

PRESET_PARAMS = {"140m": 140_248_512, "360m": 359_431_168, "950m": 949_685_760}


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=512, bos_id=1, eos_ids=[2], pad_id=0, max_seq_len=256)
    return model_preset("micro", **{**base, **kw})


def make(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("name", list(PRESET_PARAMS))
def test_preset_param_counts_exact(name):
    cfg = model_preset(name)
    assert cfg.param_count() == PRESET_PARAMS[name]
    with torch.device("meta"):
        m = Transformer(cfg)
    assert m.param_count() == PRESET_PARAMS[name]
    assert m.non_embedding_param_count() == cfg.non_embedding_param_count()
    with torch.device("meta"):  # weight sharing doubles depth, not parameters
        ws = Transformer(model_preset(name, weight_sharing=True))
    assert ws.param_count() == PRESET_PARAMS[name] and ws.n_applications == 2 * cfg.n_layers


def test_untied_param_count_and_init():
    cfg = small_cfg(tie_embeddings=False, init_std=0.05)
    m = make(cfg)
    assert m.param_count() == cfg.param_count() and m.lm_head is not None
    assert abs(m.layers[0].feed_forward.gate_proj.weight.std().item() - 0.05) < 0.002
    assert abs(m.embed_tokens.weight.std().item() - 0.05) < 0.002
    assert torch.equal(m.norm.weight, torch.ones(cfg.dim))
    assert all(p.ndim == 2 or n.endswith("layernorm.weight") or n == "norm.weight" for n, p in m.named_parameters())
    assert not any("bias" in n for n, _ in m.named_parameters())


def test_return_hidden_and_last_only():
    m = make(small_cfg())
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        logits = m(ids)
        h = m(ids, return_hidden=True)
        last = m(ids, last_only=True)
    assert h.shape == (2, 12, m.cfg.dim)
    torch.testing.assert_close(m.logits(h), logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(last, logits[:, -1:], rtol=0, atol=1e-6)


def test_weight_sharing_equals_duplicated_blocks():
    ws = make(small_cfg(weight_sharing=True, init_std=0.05))
    dup = Transformer(small_cfg(n_layers=2 * ws.cfg.n_layers)).eval()
    sd = {k: v for k, v in ws.state_dict().items() if not k.startswith("layers.")}
    for j, li in enumerate(ws.schedule):
        assert li == j // 2  # A1 A1 A2 A2 ...
        sd.update({f"layers.{j}.{k}": v for k, v in ws.layers[li].state_dict().items()})
    dup.load_state_dict(sd)
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ws(ids), dup(ids), rtol=0, atol=1e-6)


def test_document_mask_equals_separate_documents():
    m = make(small_cfg(init_std=0.05))
    lens = [[5, 9, 6], [11, 3, 6]]
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 20))
    doc_ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lens])
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lens])
    with torch.no_grad():
        by_doc = m(ids, doc_ids=doc_ids)
        by_pos = m(ids, position_ids=positions)
        for r, row in enumerate(lens):
            o = 0
            for n in row:
                alone = m(ids[r:r + 1, o:o + n])[0]
                torch.testing.assert_close(by_doc[r, o:o + n], alone, rtol=0, atol=1e-5)
                torch.testing.assert_close(by_pos[r, o:o + n], alone, rtol=0, atol=1e-5)
                o += n
        # a single document through the masked path equals the plain causal path
        torch.testing.assert_close(m(ids, doc_ids=torch.zeros_like(ids)), m(ids), rtol=0, atol=1e-5)


def test_left_padding_mask_without_cache():
    m = make(small_cfg(init_std=0.05))
    ids = torch.randint(3, 512, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(m(padded, attention_mask=mask)[:, 4:], m(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("weight_sharing", [False, True])
def test_kv_cache_decode_equals_full_forward(weight_sharing):
    m = make(small_cfg(weight_sharing=weight_sharing, init_std=0.05))
    torch.manual_seed(2)
    prompt, steps = 16, 64
    ids = torch.randint(0, 512, (2, prompt + steps))
    with torch.inference_mode():
        full = m(ids)
        cache = m.new_cache(2, prompt + steps)
        assert cache.k.shape == (m.n_applications, 2, m.cfg.n_kv_heads, prompt + steps, m.cfg.head_dim)
        pre = m(ids[:, :prompt], cache=cache)
        torch.testing.assert_close(pre, full[:, :prompt], rtol=0, atol=1e-5)
        for t in range(prompt, prompt + steps):
            step = m(ids[:, t:t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-5)
        assert cache.length == prompt + steps
        with pytest.raises(ValueError, match="cache full"):
            m(ids[:, :1], cache=cache)
        # chunked prefill (several tokens at a time after the start) and an explicit start_pos
        cache.reset()
        for a in range(0, prompt + steps, 20):
            out = m(ids[:, a:a + 20], cache=cache, start_pos=a)
            torch.testing.assert_close(out, full[:, a:a + 20], rtol=0, atol=1e-5)


def test_decode_layout_is_numerically_identical():
    m = make(small_cfg(init_std=0.05))
    ids = torch.randint(0, 512, (2, 24))
    with torch.inference_mode():
        ref = m(ids)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        m.decode_layout()
        torch.testing.assert_close(m(ids), ref, rtol=0, atol=1e-5)
        assert m.layers[0].self_attn.qkv_t is not None
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    # gradients still reach the parameters (the fused buffers are used without autograd only)
    m.train()
    m(ids).sum().backward()
    assert m.layers[0].self_attn.k_proj.weight.grad is not None


def test_long_context_and_dtype():
    cfg = long_context_config(model_preset("140m"))
    assert cfg.rope_theta == 8_000_000.0 and cfg.max_seq_len == 32768
    m = make(small_cfg())
    m.set_rope(theta=8e6, max_seq_len=512)
    assert m.cfg.rope_theta == 8e6 and m.rope_cos.shape == (512, m.cfg.head_dim // 2)
    m = m.to(torch.bfloat16)
    assert m.rope_cos.dtype == torch.float32 and m.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = m(torch.randint(0, 512, (1, 8)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 513, dtype=torch.long))


def test_checkpoint_round_trip_and_atomic_replace(tmp_path):
    m = make(small_cfg(weight_sharing=True))
    ck = tmp_path / "ck"
    save_model(ck, m, tokenizer_spec="llama3")
    loaded, meta = load_model(ck)
    assert meta["format"] == "mobilellm-r1" and meta["tokenizer"] == "llama3" and meta["config"] == m.cfg
    assert json.loads((ck / "config.json").read_text())["model"]["weight_sharing"] is True
    sd = m.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    # replacing an existing checkpoint leaves only the new one and no temp dirs behind
    m2 = make(small_cfg(), seed=1)
    save_model(ck, m2)
    assert read_meta(ck)["config"].weight_sharing is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    bf, _ = load_model(ck, dtype=torch.bfloat16)
    assert bf.embed_tokens.weight.dtype == torch.bfloat16


def test_checkpoint_bad_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    m = make(small_cfg())
    ck = tmp_path / "ck"
    save_model(ck, m)
    t = load_file(str(ck / "model.safetensors"))
    name = "layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in t.items() if k != name}, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        load_model(ck)
    save_file({**t, name: torch.zeros(7, 128)}, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[7, 128\], expected \[64, 128\]"):
        load_model(ck)
    save_file({**t, "extra.weight": torch.zeros(2)}, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra.weight'"):
        load_model(ck)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path)


def test_cli_model_info_json():
    info = run_cli_json("model", "info", "--preset", "140m")
    assert info["params"] == 140_248_512
    assert info["non_embedding_params"] == 140_248_512 - 128256 * 576
    assert info["shape"]["dim"] == 576 and info["shape"]["n_layers"] == 15 and info["shape"]["n_kv_heads"] == 3


def test_cli_init_export_import(tmp_path, capsys):
    from mobilellm_r1.cli import main

    def run(*argv):
        assert main([*map(str, argv), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    res = run("model", "init", "--preset", "micro", "--vocab-size", "1024", "--seed", "3", "--out", tmp_path / "ck")
    assert res["params"] == model_preset("micro", vocab_size=1024).param_count() and res["tokenizer"] == ""
    res = run("model", "export", tmp_path / "ck", "--hf", tmp_path / "hf")
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(res["files"])
    res = run("model", "import", tmp_path / "hf", "--out", tmp_path / "ck2")
    a, _ = load_model(tmp_path / "ck")
    b, _ = load_model(tmp_path / "ck2")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert main(["model", "import", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err
