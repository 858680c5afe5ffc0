"""Generation with the pre-allocated KV cache: equals a naive full-forward loop, left padding changes
nothing, stop tokens/strings, seeded sampling, the `generate` command."""

import json

import pytest
import torch

from mobilellm_r1.config import model_preset
from mobilellm_r1.model import Transformer
from mobilellm_r1.model.generate import generate, sample_next


def small_model(seed=0, **kw):
    base = dict(vocab_size=512, bos_id=1, eos_ids=[2], pad_id=0, max_seq_len=256, init_std=0.05)
    torch.manual_seed(seed)
    return Transformer(model_preset("micro", **{**base, **kw})).eval()


def naive_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [1, 7, 8], [1, 300, 301, 302, 303, 304]]


@pytest.mark.parametrize("weight_sharing", [False, True])
def test_greedy_equals_naive_loop(weight_sharing):
    m = small_model(weight_sharing=weight_sharing)
    res = generate(m, [PROMPTS[0]], 32, stop_token_ids=[])
    assert res.token_ids[0] == naive_greedy(m, PROMPTS[0], 32)
    assert res.finish_reasons == ["length"] and res.new_tokens == 32 and res.prompt_tokens == len(PROMPTS[0])
    assert res.tokens_per_s > 0 and res.prefill_s > 0 and res.decode_s > 0


@pytest.mark.parametrize("weight_sharing", [False, True])
def test_left_padded_batch_equals_unbatched(weight_sharing):
    m = small_model(weight_sharing=weight_sharing)
    batched = generate(m, PROMPTS, 24, stop_token_ids=[])
    for p, got in zip(PROMPTS, batched.token_ids):
        assert got == generate(m, [p], 24, stop_token_ids=[]).token_ids[0]


def test_decode_layout_generates_the_same():
    m = small_model()
    ref = generate(m, PROMPTS, 16, stop_token_ids=[]).token_ids
    m.decode_layout()
    assert generate(m, PROMPTS, 16, stop_token_ids=[]).token_ids == ref


def test_stop_token_per_row():
    m = small_model()
    free = generate(m, PROMPTS, 20, stop_token_ids=[]).token_ids
    stop = free[0][5]
    k = free[0].index(stop)
    res = generate(m, PROMPTS, 20, stop_token_ids=[stop])
    assert res.token_ids[0] == free[0][: k + 1] and res.finish_reasons[0] == "stop_token"
    for i in (1, 2):  # other rows continue until their own stop or the limit
        if stop in free[i]:
            assert res.token_ids[i] == free[i][: free[i].index(stop) + 1]
        else:
            assert res.token_ids[i] == free[i] and res.finish_reasons[i] == "length"


def test_stop_string():
    m = small_model()

    def decode(ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    free = generate(m, [PROMPTS[1]], 30, stop_token_ids=[]).token_ids[0]
    text = decode(free)
    stop = text[6:9]
    end = text.index(stop) + len(stop)  # one character per token
    res = generate(m, [PROMPTS[1]], 30, stop_token_ids=[], stop_strings=[stop], decode=decode)
    assert res.token_ids[0] == free[:end] and res.finish_reasons == ["stop_string"] and res.stop_strings == [stop]
    with pytest.raises(ValueError, match="decode"):
        generate(m, [PROMPTS[1]], 5, stop_strings=["x"])


def test_sampling_seeded_and_top_p():
    m = small_model()
    a = generate(m, PROMPTS, 16, temperature=1.0, seed=7, stop_token_ids=[]).token_ids
    b = generate(m, PROMPTS, 16, temperature=1.0, seed=7, stop_token_ids=[]).token_ids
    c = generate(m, PROMPTS, 16, temperature=1.0, seed=8, stop_token_ids=[]).token_ids
    assert a == b and a != c
    greedy = generate(m, PROMPTS, 16, stop_token_ids=[]).token_ids
    assert generate(m, PROMPTS, 16, temperature=1.0, top_p=1e-6, seed=3, stop_token_ids=[]).token_ids == greedy
    # top-p keeps the smallest head of the distribution reaching p
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.75, g)) for _ in range(300)}
    assert draws == {0, 1}


def test_limits_and_errors():
    m = small_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(m, [[1] * 250], 10)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(m, [[1, 600]], 4)
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [[]], 4)
    assert generate(m, [[1, 2, 3]], 0).token_ids == [[]]


def test_cli_generate_json(tmp_path, capsys):
    from mobilellm_r1.cli import main

    ck = tmp_path / "ck"
    assert main(["model", "init", "--preset", "micro", "--out", str(ck), "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["generate", str(ck), "--prompt", "The sum of 2 and 3 is", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "prompt_ids", "token_ids", "tokens_per_s"}
    assert out["prompt_ids"][0] == 128000 and len(out["token_ids"]) <= 6 and out["tokens_per_s"] > 0
    from mobilellm_r1.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    ids = out["token_ids"][:-1] if out["finish_reason"] == "stop_token" else out["token_ids"]
    assert out["text"] == tok.decode(ids)
    # same tokens as the library call on the same checkpoint
    from mobilellm_r1.model.io import load_model

    model, _ = load_model(ck)
    ref = generate(model, [out["prompt_ids"]], 6, stop_token_ids=[i for i in tok.eos_ids])
    assert ref.token_ids[0] == out["token_ids"]
