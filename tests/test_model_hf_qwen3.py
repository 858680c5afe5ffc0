"""Qwen3 export: transformers' Qwen3ForCausalLM on `export_hf(..., arch="qwen3")` gives our logits (fp32,
<= 1e-4) with and without LS sharing and for a MobileLLM-R1-shaped model imported from an HF Llama4
directory; a wrong permutation is caught; unknown arch errors; the llama4 export loads with
attention_chunk_size null and old exports (chunk = context length) still import."""

import json

import pytest
import torch

from mobilellm_r1.config import model_preset
from mobilellm_r1.model import Transformer
from mobilellm_r1.model.hf import export_hf, hf_config, import_hf, load_hf
from mobilellm_r1.model.io import CheckpointError

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def small(**kw):
    base = dict(vocab_size=512, bos_id=1, eos_ids=[2], pad_id=0, max_seq_len=256, init_std=0.05)
    torch.manual_seed(0)
    return Transformer(model_preset("micro", **{**base, **kw})).eval()


def qwen3_logit_error(model, d, seq=24, batch=2):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert hf.config.num_hidden_layers == model.n_applications
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return (model(ids) - hf(ids).logits).abs().max().item()


@pytest.mark.parametrize("kw", [{}, {"weight_sharing": True}, {"tie_embeddings": False, "n_kv_heads": 2}])
def test_qwen3_parity_small(tmp_path, kw):
    m = small(**kw)
    export_hf(m, tmp_path / "q", arch="qwen3")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["head_dim"] == m.cfg.head_dim
    assert cfg["tie_word_embeddings"] == m.cfg.tie_embeddings and cfg["attention_bias"] is False
    assert cfg["use_sliding_window"] is False and cfg["rope_theta"] == m.cfg.rope_theta
    err = qwen3_logit_error(m, tmp_path / "q")
    assert err <= 1e-4, err


def test_qwen3_parity_catches_missing_permutation(tmp_path):
    """Negative control: the llama4 (interleaved) q/k rows under Qwen3's rotate_half RoPE are wrong."""
    from safetensors.torch import load_file, save_file

    m = small()
    export_hf(m, tmp_path / "q", arch="qwen3")
    export_hf(m, tmp_path / "l")
    q, raw = load_file(str(tmp_path / "q" / "model.safetensors")), load_file(str(tmp_path / "l" / "model.safetensors"))
    for k in q:
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            q[k] = raw[k]
    save_file(q, str(tmp_path / "q" / "model.safetensors"))
    assert qwen3_logit_error(m, tmp_path / "q") > 1e-2


def test_qwen3_parity_real_config_import(tmp_path):
    """A MobileLLM-R1-140M-shaped Llama4ForCausalLM (real vocab, d 576, 9/3 heads, head_dim 64, theta 8e6,
    2 of its 15 layers to stay fast) saved by transformers, imported by us, exported as qwen3."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    real = model_preset("140m", n_layers=2, rope_theta=8e6, max_seq_len=32768)
    hf_cfg = {k: v for k, v in hf_config(real).items() if k not in ("architectures", "model_type", "dtype")}
    torch.manual_seed(1)
    src = Llama4ForCausalLM(Llama4TextConfig(**hf_cfg)).eval()
    src.save_pretrained(tmp_path / "llama4")
    _, ours, _ = import_hf(tmp_path / "llama4", tmp_path / "ck")
    assert (ours.cfg.head_dim, ours.cfg.n_heads, ours.cfg.n_kv_heads, ours.cfg.vocab_size) == (64, 9, 3, 128256)
    export_hf(tmp_path / "ck", tmp_path / "q", arch="qwen3")
    assert qwen3_logit_error(ours.eval(), tmp_path / "q", seq=16, batch=1) <= 1e-4


def test_export_arch_errors_and_atomic(tmp_path):
    m = small()
    with pytest.raises(CheckpointError, match="unknown export arch 'gemma'"):
        export_hf(m, tmp_path / "x", arch="gemma")
    assert not (tmp_path / "x").exists()
    with pytest.raises(CheckpointError, match="QK-norm"):
        export_hf(small(qk_norm=False), tmp_path / "y", arch="qwen3")
    assert not (tmp_path / "y").exists() and list(tmp_path.iterdir()) == []  # no temp dir left behind


def test_llama4_chunk_null_and_old_exports_import(tmp_path):
    m = small()
    export_hf(m, tmp_path / "l")
    cfg_path = tmp_path / "l" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["attention_chunk_size"] is None
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "l").config.attention_chunk_size is None
    cfg["attention_chunk_size"] = m.cfg.max_seq_len  # what exports before this change wrote
    cfg_path.write_text(json.dumps(cfg))
    back = load_hf(tmp_path / "l")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))


def test_cli_export_qwen3(tmp_path):
    from mobilellm_r1.cli import main
    from mobilellm_r1.model.io import save_model

    m = small()
    save_model(tmp_path / "ck", m, tokenizer_spec="")
    assert main(["model", "export", str(tmp_path / "ck"), "--hf", str(tmp_path / "q"), "--arch", "qwen3"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert main(["model", "export", str(tmp_path / "ck"), "--hf", str(tmp_path / "z"), "--arch", "nope"]) != 0
    assert not (tmp_path / "z").exists()
