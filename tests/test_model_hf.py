"""Hugging Face interop: our logits equal transformers' Llama4ForCausalLM on our export; import(export(m))
is bit-exact; real-checkpoint layouts (sharded, bf16, lm_head present) import; bad input names the tensor."""

import json
import time

import pytest
import torch

from mobilellm_r1.config import model_preset
from mobilellm_r1.model import Transformer
from mobilellm_r1.model.hf import export_hf, hf_config, import_hf, load_hf
from mobilellm_r1.model.io import CheckpointError, load_model, save_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def small_cfg(**kw):
    base = dict(vocab_size=512, bos_id=1, eos_ids=[2], pad_id=0, max_seq_len=256)
    return model_preset("micro", **{**base, **kw})


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def hf_load(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def same_weights(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def assert_parity(model, d, seq=24, batch=2, tol=1e-4):
    hf = hf_load(d)
    assert type(hf).__name__ == "Llama4ForCausalLM"
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    err = (ours - theirs).abs().max().item()
    assert err <= tol, f"max abs logit error {err}"
    return hf, err


@pytest.mark.parametrize("kw", [{}, {"weight_sharing": True}, {"tie_embeddings": False, "n_kv_heads": 2}])
def test_parity_small(tmp_path, kw):
    m = make(small_cfg(init_std=0.05, **kw))
    export_hf(m, tmp_path / "hf")
    hf, _ = assert_parity(m, tmp_path / "hf")
    assert hf.config.num_hidden_layers == m.n_applications
    if m.cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_parity_catches_a_rope_permutation(tmp_path):
    """Negative control: rotate_half-style q/k (pairs (j, j+hd/2)) would be a visible error."""
    from safetensors.torch import load_file, save_file

    m = make(small_cfg(init_std=0.05))
    d = tmp_path / "hf"
    export_hf(m, d)
    t = load_file(str(d / "model.safetensors"))
    hd = m.cfg.head_dim
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    for k in list(t):
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            w = t[k].view(-1, hd, t[k].shape[1])
            t[k] = w[:, perm].reshape(t[k].shape).contiguous()
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(AssertionError, match="max abs logit error"):
        assert_parity(m, d)


def test_parity_140m(tmp_path):
    t0 = time.perf_counter()
    m = make(model_preset("140m"))
    export_hf(m, tmp_path / "hf")
    assert_parity(m, tmp_path / "hf", seq=16, batch=1)
    assert time.perf_counter() - t0 < 60


def test_hf_config_and_files(tmp_path):
    from safetensors import safe_open

    m = make(small_cfg())
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "config.json").write_text("{\"not\": \"copied\"}")
    export_hf(m, tmp_path / "hf", tokenizer_files_dir=tok)
    d = tmp_path / "hf"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama4_text" and cfg["architectures"] == ["Llama4ForCausalLM"]
    assert cfg["moe_layers"] == [] and cfg["interleave_moe_layer_step"] == 0
    assert cfg["no_rope_layers"] == [1] * 4 and cfg["layer_types"] == ["full_attention"] * 4
    assert cfg["attn_temperature_tuning"] is False and cfg["use_qk_norm"] is True
    assert cfg["tie_word_embeddings"] is True and cfg["intermediate_size_mlp"] == 384
    assert cfg["eos_token_id"] == [2] and cfg["pad_token_id"] == 0 and cfg["bos_token_id"] == 1
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == [2]
    assert (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()
    assert "model_type" in json.loads((d / "config.json").read_text())
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert {f"model.layers.3.{n}.weight" for n in ("self_attn.q_proj", "self_attn.o_proj", "feed_forward.gate_proj",
                                                   "feed_forward.down_proj", "input_layernorm",
                                                   "post_attention_layernorm")} <= keys
    # the Llama-3 presets keep their special ids
    full = hf_config(model_preset("950m"))
    assert full["eos_token_id"] == [128001, 128008, 128009] and full["pad_token_id"] == 127999
    assert full["head_dim"] == 64 and full["rms_norm_eps"] == 1e-5 and full["rope_parameters"]["rope_theta"] == 1e6


@pytest.mark.parametrize("kw", [{}, {"weight_sharing": True}, {"tie_embeddings": False}])
def test_round_trip_bit_exact(tmp_path, kw):
    m = make(small_cfg(**kw))
    save_model(tmp_path / "ck", m, tokenizer_spec="llama3")
    export_hf(tmp_path / "ck", tmp_path / "hf")  # from a checkpoint directory
    _, back, spec = import_hf(tmp_path / "hf", tmp_path / "ck2")
    assert same_weights(m, back) and back.cfg == m.cfg
    loaded, meta = load_model(tmp_path / "ck2")
    assert same_weights(m, loaded) and meta["config"] == m.cfg


def test_import_real_layout_sharded_bf16_with_lm_head(tmp_path):
    """Like a downloaded checkpoint: bf16, lm_head.weight on disk, two shards plus an index."""
    from safetensors.torch import load_file, save_file

    m = make(small_cfg())
    export_hf(m, tmp_path / "hf")
    d = tmp_path / "hf"
    t = {k: v.to(torch.bfloat16) for k, v in load_file(str(d / "model.safetensors")).items()}
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    (d / "model.safetensors").unlink()
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, ks in shards.items():
        save_file({k: t[k] for k in ks}, str(d / f))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    _, back, _ = import_hf(d, tmp_path / "ck")
    assert back.embed_tokens.weight.dtype == torch.bfloat16
    assert same_weights(m.to(torch.bfloat16), back)
    f32 = load_hf(d, dtype=torch.float32)
    assert f32.embed_tokens.weight.dtype == torch.float32


def _break(tmp_path, edit):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "hf"
    export_hf(make(small_cfg()), d)
    t = load_file(str(d / "model.safetensors"))
    edit(t)
    save_file(t, str(d / "model.safetensors"))
    return d


def test_import_errors_name_the_tensor(tmp_path):
    name = "model.layers.2.feed_forward.up_proj.weight"
    d = _break(tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        import_hf(d, tmp_path / "ck")
    d = _break(tmp_path, lambda t: t.__setitem__(name, torch.zeros(384, 100)))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[384, 100\], expected \[384, 128\]"):
        import_hf(d, tmp_path / "ck")
    d = _break(tmp_path, lambda t: t.__setitem__("model.layers.2.mlp.router.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.2.mlp.router.weight'"):
        import_hf(d, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    # configs our dense decoder cannot run
    cfg = json.loads((d / "config.json").read_text())
    for key, val, msg in [("moe_layers", [1], "MoE"), ("no_rope_layers", [1, 1, 1, 0], "NoPE"),
                          ("model_type", "llama", "model_type")]:
        (d / "config.json").write_text(json.dumps({**cfg, key: val}))
        with pytest.raises(CheckpointError, match=msg):
            load_hf(d)


def test_hf_generate_matches_ours(tmp_path):
    from mobilellm_r1.model.generate import generate

    m = make(small_cfg(init_std=0.05))
    export_hf(m, tmp_path / "hf")
    hf = hf_load(tmp_path / "hf")
    prompt = [1, 17, 99, 240, 5, 6]
    ours = generate(m, [prompt], 24, stop_token_ids=[]).token_ids[0]
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()


def test_tokenizer_files_travel_through_import_and_export(tmp_path):
    m = make(small_cfg())
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"fake": true}')
    (tok / "tokenizer_config.json").write_text("{}")
    export_hf(m, tmp_path / "hf", tokenizer_files_dir=tok)
    _, _, spec = import_hf(tmp_path / "hf", tmp_path / "ck")
    assert spec == "tokenizer" and (tmp_path / "ck" / "tokenizer" / "tokenizer.json").is_file()
    export_hf(tmp_path / "ck", tmp_path / "hf2")  # the checkpoint's tokenizer folder is copied back out
    assert (tmp_path / "hf2" / "tokenizer.json").read_text() == '{"fake": true}'
    # the Llama-3 vocabulary maps to the built-in spec
    _, _, spec = import_hf(tmp_path / "hf", tmp_path / "ck3", tokenizer_spec="llama3")
    assert spec == "llama3" and not (tmp_path / "ck3" / "tokenizer").exists()


def test_import_what_transformers_saves(tmp_path):
    """A directory written by transformers' own save_pretrained (its config spelling) imports bit-exact."""
    m = make(small_cfg(init_std=0.05))
    export_hf(m, tmp_path / "hf")
    hf_load(tmp_path / "hf").save_pretrained(tmp_path / "resaved")
    _, back, _ = import_hf(tmp_path / "resaved", tmp_path / "ck")
    assert same_weights(m, back) and back.cfg == m.cfg
