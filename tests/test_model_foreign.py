"""Foreign Hugging Face causal LMs (not our Llama4 decoder) behind our decoder's interface.

Small randomly initialised transformers models (Qwen2 with q/k/v biases and GQA, GPT-2 with learned
absolute positions) carry the SmolLM2 tokenizer, so the harness runs on them end to end offline.
"""

from __future__ import annotations

import json

import pytest
import torch

from mobilellm_r1.model.foreign import ForeignCausalLM
from mobilellm_r1.model.generate import generate
from mobilellm_r1.model.gguf import load_any

transformers = pytest.importorskip("transformers")


def _tokenizer_files(dst):
    from mobilellm_r1.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2")
    tok._tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def _make(kind: str, root):
    torch.manual_seed(0)
    common = dict(vocab_size=49152, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512, tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    d = root / kind
    model.save_pretrained(d)
    _tokenizer_files(d)
    return d, model.eval()


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def foreign(request, tmp_path_factory):
    d, ref = _make(request.param, tmp_path_factory.mktemp("hf"))
    model, meta = load_any(d)
    return d, ref, model, meta


def test_loads_through_load_any(foreign):
    d, ref, model, meta = foreign
    assert isinstance(model, ForeignCausalLM)
    assert meta["format"] == "hf" and meta["tokenizer"] == str(d.resolve())
    assert model.cfg.vocab_size == 49152 and model.cfg.max_seq_len == 512 and model.cfg.eos_ids == [0]


def test_logits_match_transformers(foreign):
    _, ref, model, _ = foreign
    ids = torch.randint(1, 49152, (2, 17))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
        hidden = model(ids, return_hidden=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logits(hidden), want, rtol=1e-5, atol=1e-5)


def test_left_padding_matches_unpadded_rows(foreign):
    _, ref, model, _ = foreign
    a, b = torch.randint(1, 49152, (1, 9)), torch.randint(1, 49152, (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    with torch.no_grad():
        got = model(ids, attention_mask=mask, last_only=True)[:, -1]
        want = torch.cat([ref(a).logits[:, -1], ref(b).logits[:, -1]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_transformers(foreign):
    _, ref, model, _ = foreign
    prompts = [[5, 17, 923, 44, 1000], [77, 3]]
    res = generate(model, prompts, max_new_tokens=12, stop_token_ids=[])
    for p, out in zip(prompts, res.token_ids):
        want = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                            pad_token_id=0)[0, len(p):].tolist()
        assert out == want


def test_loglik_and_probe_run_on_foreign(foreign):
    from mobilellm_r1.eval.loglik import continuation_logprobs
    from mobilellm_r1.eval.probe import text_nll
    from mobilellm_r1.tokenizer import load_tokenizer

    d, ref, model, meta = foreign
    tok = load_tokenizer(meta["tokenizer"])
    ctx, cont = "The capital of France is", " Paris."
    lp, n_tokens, _greedy = continuation_logprobs(model, tok, [(ctx, cont)])[0]
    full = tok.encode(ctx + cont, bos=True)
    n_ctx = len(tok.encode(ctx, bos=True))
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([full])).logits[0].double(), -1)
    want = sum(logp[i - 1, full[i]].item() for i in range(n_ctx, len(full)))
    assert lp == pytest.approx(want, abs=1e-3) and n_tokens == len(full) - n_ctx
    res = text_nll(model, tok, ["Call me Ishmael. Some years ago, never mind how long precisely."])
    assert res["tokens"] > 5 and res["nll"] > 5.0  # an untrained 49k-vocab model: near ln(49152) = 10.8


def test_eval_runner_on_foreign(foreign, tmp_path):
    from mobilellm_r1.eval.runner import EvalConfig, run_eval

    d, *_ = foreign
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                            + "\n" for i in range(3)))
    summary = run_eval(str(d), EvalConfig(task="gsm8k", data=str(data), max_new_tokens=8, out=str(tmp_path / "o"),
                                          style="chat", progress=False))
    assert summary["n"] == 3 and 0.0 <= summary["pass@1"] <= 1.0
    rows = [json.loads(x) for x in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("completion" in r for r in rows)


def test_doc_ids_are_refused(foreign):
    _, _, model, _ = foreign
    with pytest.raises(ValueError, match="packed documents"):
        model(torch.ones(1, 4, dtype=torch.long), doc_ids=torch.zeros(1, 4, dtype=torch.long))
