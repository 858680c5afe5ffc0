"""The optional vLLM engine (skipped without the `vllm` extra): our export under vLLM generates our greedy
tokens, LS weight sharing included; a weight push through vLLM's `load_weights` makes it generate the new
model's tokens (GRPO's per-step sync); finish reasons map to ours."""

import json

import pytest
import torch

from mobilellm_r1.config import model_preset
from mobilellm_r1.model import Transformer
from mobilellm_r1.model.engine import EngineConfig, Request
from mobilellm_r1.model.generate import generate
from mobilellm_r1.model.vllm_backend import INSTALL_HINT, VLLMEngine, VLLMOptions, vllm_available

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (optional extra)")

PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [1, 7, 8], [1, 300, 301, 302, 303, 304]]


def small_model(seed=0, **kw):
    # init_std 0.3 gives peaked logits: fp32 reductions in a different order cannot flip an argmax
    base = dict(vocab_size=512, bos_id=1, eos_ids=[2], pad_id=0, max_seq_len=256, init_std=0.3)
    torch.manual_seed(seed)
    return Transformer(model_preset("micro", **{**base, **kw})).eval()


def ours(model, n=24, stop=()):
    return generate(model, PROMPTS, n, stop_token_ids=list(stop)).token_ids


def greedy(eng, model_len=24, stop=()):
    res = eng.run([Request(p, model_len) for p in PROMPTS], EngineConfig(stop_token_ids=list(stop)))
    return [c[0] for c in res.completions]


@pytest.mark.parametrize("weight_sharing", [False, True])
def test_greedy_equals_ours_and_weight_push(weight_sharing):
    a, b = small_model(0, weight_sharing=weight_sharing), small_model(1, weight_sharing=weight_sharing)
    eng = VLLMEngine(a, VLLMOptions(dtype="float32", enforce_eager=True))
    try:
        assert [c.token_ids for c in greedy(eng)] == ours(a)
        assert ours(a) != ours(b)
        eng.load_model_weights(b)
        assert [c.token_ids for c in greedy(eng)] == ours(b)
        # a stop id ends a row with it kept, as our generator keeps it
        stop = ours(b)[0][5]
        res = greedy(eng, stop=[stop])[0]
        assert (res.token_ids, res.finish_reason) == (ours(b, stop=[stop])[0], "stop_token")
        # samples seeded per sample: reproducible whatever else is in the batch, and the n differ
        cfg = EngineConfig(temperature=1.0, seed=0, stop_token_ids=[])
        seeds = [5, 6, 7, 8]
        s1 = eng.run([Request(PROMPTS[1], 16, n=4, seeds=seeds)], cfg).completions[0]
        s2 = eng.run([Request(PROMPTS[0], 16, n=2), Request(PROMPTS[1], 16, n=4, seeds=seeds)], cfg).completions[1]
        assert [c.token_ids for c in s1] == [c.token_ids for c in s2]
        assert len({tuple(c.token_ids) for c in s1}) > 1
        assert all(c.finish_reason == "length" and len(c.token_ids) == 16 for c in s1)
        with pytest.raises(ValueError, match="at least one token"):
            eng.run([Request([], 4)])
    finally:
        eng.close()


def test_hint_names_the_extra():
    assert "mobilellm-r1[vllm]" in INSTALL_HINT


def test_eval_engine_vllm_scores_the_same_completions(tmp_path):
    from mobilellm_r1.eval.runner import EvalConfig, run_eval
    from mobilellm_r1.model.io import save_model

    model = small_model(2, vocab_size=8192, bos_id=1, eos_ids=[2])
    save_model(tmp_path / "ckpt", model, "smollm2:8192")
    runs = {}
    for engine in ("ours", "vllm"):
        cfg = EvalConfig(task="arith", limit=6, max_new_tokens=24, out=str(tmp_path / engine), progress=False,
                         engine=engine, device="cpu")
        res = run_eval(str(tmp_path / "ckpt"), cfg)
        assert res["engine"] == engine and res["n"] == 6
        rows = [json.loads(x) for x in (tmp_path / engine / "samples.jsonl").read_text().splitlines()]
        runs[engine] = sorted((r["id"], r["completion"], r["finish_reason"]) for r in rows)
    assert runs["ours"] == runs["vllm"]
