"""The continuous-batching engine: greedy rows equal each prompt generated alone, whatever the slots; n
samples prefill once and are reproducible per seed regardless of their neighbours; stops free slots."""

import pytest
import torch

from mobilellm_r1.config import model_preset
from mobilellm_r1.model import Transformer
from mobilellm_r1.model.engine import EngineConfig, Request, run
from mobilellm_r1.model.generate import generate


def small_model(seed=0, **kw):
    base = dict(vocab_size=512, bos_id=1, eos_ids=[2], pad_id=0, max_seq_len=256, init_std=0.05)
    torch.manual_seed(seed)
    return Transformer(model_preset("micro", **{**base, **kw})).eval()


def prompts(k=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (k,), generator=g)]


@pytest.mark.parametrize("weight_sharing", [False, True])
def test_greedy_equals_each_prompt_alone(weight_sharing):
    m = small_model(weight_sharing=weight_sharing)
    ps = prompts()
    lengths = [5 + 3 * i for i in range(len(ps))]  # rows end at different steps: slots are refilled
    alone = [generate(m, [p], n, stop_token_ids=[]).token_ids[0] for p, n in zip(ps, lengths)]
    for slots in (1, 3, 16):
        res = run(m, [Request(p, n) for p, n in zip(ps, lengths)], EngineConfig(slots=slots, stop_token_ids=[]))
        assert [c[0].token_ids for c in res.completions] == alone
        assert all(c[0].finish_reason == "length" for c in res.completions)
        assert res.prefills == len(ps) and res.new_tokens == sum(lengths)
    # fewer slots than requests takes more decode steps, never more tokens
    assert run(m, [Request(p, n) for p, n in zip(ps, lengths)], EngineConfig(slots=2, stop_token_ids=[])
               ).decode_steps > res.decode_steps


def test_samples_prefill_once_and_do_not_depend_on_slots():
    m = small_model()
    ps = prompts(3)
    reqs = [Request(p, 20, n=5) for p in ps]
    runs = [run(m, reqs, EngineConfig(slots=s, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[]))
            for s in (2, 7, 15)]
    toks = [[[c.token_ids for c in r] for r in res.completions] for res in runs]
    assert toks[0] == toks[1] == toks[2]
    assert all(res.prefills == 3 for res in runs)
    assert len({tuple(t) for t in toks[0][0]}) > 1  # the n samples differ
    # with explicit seeds, a request's samples are the same with or without other requests beside it
    seeds = [11, 12, 13, 14, 15]
    cfg = EngineConfig(slots=2, temperature=1.0, seed=0, stop_token_ids=[])
    alone = run(m, [Request(ps[1], 20, n=5, seeds=seeds)], cfg)
    beside = run(m, [Request(ps[0], 20, n=5), Request(ps[1], 20, n=5, seeds=seeds)], cfg)
    assert [c.token_ids for c in alone.completions[0]] == [c.token_ids for c in beside.completions[1]]


def test_stops_free_slots_and_are_reported():
    m = small_model()
    ps = prompts(6)
    free_run = [generate(m, [p], 30, stop_token_ids=[]).token_ids[0] for p in ps]
    stop = free_run[0][4]  # the first prompt meets this token at its fifth step
    res = run(m, [Request(p, 30) for p in ps], EngineConfig(slots=2, stop_token_ids=[stop]))
    first = res.completions[0][0]
    assert first.finish_reason == "stop_token" and first.token_ids == free_run[0][:free_run[0].index(stop) + 1]
    for c, alone in zip(res.completions, free_run):
        cut = alone.index(stop) + 1 if stop in alone else 30
        assert c[0].token_ids == alone[:cut]

    def decode(ids):
        return " ".join(map(str, ids))

    target = str(free_run[2][6])
    res = run(m, [Request(ps[2], 30)], EngineConfig(slots=1, stop_token_ids=[], stop_strings=[target]),
              decode=decode)
    c = res.completions[0][0]
    assert c.finish_reason == "stop_string" and c.stop_string == target and len(c.token_ids) <= 7


def test_callbacks_stream_and_complete():
    m = small_model()
    ps = prompts(4)
    seen, done = {}, []
    res = run(m, [Request(p, 6, n=2) for p in ps], EngineConfig(slots=3, temperature=1.0, stop_token_ids=[]),
              on_token=lambda r, s, t: seen.setdefault((r, s), []).append(t),
              on_complete=lambda r, s, c: done.append((r, s)))
    assert sorted(done) == [(r, s) for r in range(4) for s in range(2)]
    assert all(seen[(r, s)] == res.completions[r][s].token_ids for r in range(4) for s in range(2))


def test_bad_requests():
    m = small_model()
    with pytest.raises(ValueError, match="at least one token"):
        run(m, [Request([], 4)])
    with pytest.raises(ValueError, match="exceeds the slot length"):
        run(m, [Request([1] * 250, 10)])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        run(m, [Request([1, 9999], 4)])
    with pytest.raises(ValueError, match="seeds"):
        run(m, [Request([1, 2], 4, n=2, seeds=[1])])
    with pytest.raises(ValueError, match="decode function"):
        run(m, [Request([1, 2], 4)], EngineConfig(stop_strings=["x"]))
    assert run(m, [Request([1, 2], 0)]).completions[0][0].token_ids == []
