import json

import numpy as np
import pytest

from conftest import run_cli_json
from mobilellm_r1.data.mixture import MixtureSampler, feistel_permute
from mobilellm_r1.data.shards import ShardSet, TokenizeOptions, tokenize_sources


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three real-text sources of different sizes, tokenized with the Llama-3 tokenizer."""
    import sysconfig
    from pathlib import Path

    root = tmp_path_factory.mktemp("mix")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    groups = {"code": sorted(stdlib.glob("[a-m]*.py"))[:60], "prose": sorted(stdlib.glob("[n-z]*.py"))[:20],
              "small": sorted(stdlib.glob("json/*.py"))}
    inputs = {}
    for name, files in groups.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files))
        inputs[name] = [str(path)]
    tokenize_sources(inputs, root / "shards", TokenizeOptions(workers=2, progress=False))
    return ShardSet(root / "shards")


def test_feistel_is_a_seeded_bijection():
    for n in (1, 2, 3, 10, 1000, 4097):
        p = feistel_permute(np.arange(n), n, key=7)
        assert sorted(p.tolist()) == list(range(n))
        assert [feistel_permute(i, n, key=7) for i in range(n)] == p.tolist()
    a, b = feistel_permute(np.arange(1000), 1000, 1), feistel_permute(np.arange(1000), 1000, 2)
    assert (a != b).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9


def test_realised_shares_within_one_percent_over_a_million_tokens(shards):
    weights = {"code": 0.6, "prose": 0.3, "small": 0.1}
    s = MixtureSampler(shards, weights, seq_len=127, seed=3)
    per = {k: 0 for k in weights}
    n = 0
    while n * 128 < 1_000_000:
        toks, src, _ = next(s)
        assert toks.shape == (128,)
        per[src] += 128
        n += 1
    for k, w in weights.items():
        assert abs(per[k] / (n * 128) - w) < 0.01, (k, per[k] / (n * 128))
    # "small" holds far fewer than 1e6 * 0.1 tokens: it must have repeated with a fresh shuffle
    assert shards.n_tokens("small") < 100_000 and s.counts["small"] > s.n_chunks["small"]


def test_sequences_come_from_the_real_stream_with_doc_ids(shards):
    s = MixtureSampler(shards, {"small": 1.0}, seq_len=64, seed=0)
    bos = shards.index["bos_id"]
    starts = set(shards.doc_starts("small").tolist())
    for _ in range(50):
        toks, src, doc = next(s)
        chunk = s._chunk("small", s.counts["small"] - 1)
        assert toks.tolist() == shards.tokens("small", chunk * 64, 65).tolist()
        # a new document starts exactly where a BOS token sits
        for i in range(1, 65):
            assert (doc[i] != doc[i - 1]) == ((chunk * 64 + i) in starts)
            if doc[i] != doc[i - 1]:
                assert toks[i] == bos


def test_resume_gives_identical_sequences(shards, tmp_path):
    w = {"code": 0.5, "prose": 0.3, "small": 0.2}
    ref = MixtureSampler(shards, w, seq_len=32, seed=11)
    expected = [next(ref)[0] for _ in range(300)]
    first = MixtureSampler(shards, w, seq_len=32, seed=11)
    got = [next(first)[0] for _ in range(137)]
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = MixtureSampler(shards, w, seq_len=32, seed=11)
    resumed.load_state_dict(state)
    got += [next(resumed)[0] for _ in range(300 - 137)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    other_seed = MixtureSampler(shards, w, seq_len=32, seed=12)
    assert not all(np.array_equal(next(other_seed)[0], e) for e in expected[:20])
    with pytest.raises(ValueError, match="seq_len"):
        MixtureSampler(shards, w, seq_len=16, seed=11).load_state_dict(state)


def test_two_ranks_are_disjoint_and_cover_the_single_rank_stream(shards):
    w = {"code": 0.7, "small": 0.3}
    single = MixtureSampler(shards, w, seq_len=64, seed=5)
    ranks = [MixtureSampler(shards, w, seq_len=64, seed=5, rank=r, world_size=2) for r in range(2)]
    ref = [next(single) for _ in range(400)]
    got = [[next(r) for _ in range(200)] for r in ranks]
    key = lambda item: (item[1], item[0].tobytes())
    a, b = {key(x) for x in got[0]}, {key(x) for x in got[1]}
    assert not a & b
    assert a | b == {key(x) for x in ref}
    for i, item in enumerate(ref):  # rank r holds exactly the sequences g ≡ r (mod 2)
        assert key(item) == key(got[i % 2][i // 2])


def test_no_repeat_equal_sampling_and_leave_one_out(shards):
    s = MixtureSampler.equal(shards, ["code", "prose", "small"], seq_len=64, seed=0)
    seen = []
    with pytest.raises(StopIteration):
        while True:
            seen.append(next(s))
    counts = s.counts
    assert counts["small"] == s.n_chunks["small"]  # the smallest source was used up exactly once
    assert max(counts.values()) - min(counts.values()) <= 1  # equal per-source sampling
    chunks = [x[0].tobytes() for x in seen if x[1] == "small"]
    assert len(set(chunks)) == len(chunks)  # no repeats
    loo = MixtureSampler(shards, {"code": 1, "prose": 1, "small": 1}, seq_len=64, exclude=["small"])
    assert {next(loo)[1] for _ in range(100)} == {"code", "prose"}
    with pytest.raises(KeyError):
        MixtureSampler(shards, {"code": 1}, seq_len=64, exclude=["nope"])


def test_sample_cli_shares_and_state_round_trip(shards, tmp_path):
    args = ["data", "sample", "--shards", shards.root, "--weights", "code=0.75,prose=0.25", "--seq-len", "64",
            "--seed", "1"]
    full = run_cli_json(*args, "--count", "40")
    assert full["shares"] == {"code": 0.75, "prose": 0.25} and full["sequences"] == 40
    part = run_cli_json(*args, "--count", "25", "--state-out", tmp_path / "st.json")
    rest = run_cli_json(*args, "--count", "15", "--state-in", tmp_path / "st.json")
    assert part["first_tokens"] == full["first_tokens"]
    assert rest["cumulative_shares"] == full["cumulative_shares"]


def test_heldout_split_is_disjoint_from_train_and_covers_its_chunks(shards):
    kw = dict(seq_len=64, seed=5, heldout_fraction=0.1, repeat=False)
    train = MixtureSampler(shards, {"small": 1.0}, split="train", **kw)
    held = MixtureSampler(shards, {"small": 1.0}, split="heldout", **kw)
    n = (shards.n_tokens("small") - 1) // 64
    assert held.n_chunks["small"] == -(-n // 10) and train.n_chunks["small"] + held.n_chunks["small"] == n

    def starts(s):
        out = []
        while True:
            try:
                out.append(s.next_row()[3])
            except StopIteration:
                return out

    tr, he = starts(train), starts(held)
    assert len(tr) == train.n_chunks["small"] and len(he) == held.n_chunks["small"]
    assert not set(tr) & set(he) and len(set(tr) | set(he)) == n
    assert min(he) > max(tr)  # the held-out chunks are the tail of the stream
    with pytest.raises(ValueError, match="split"):
        MixtureSampler(shards, {"small": 1.0}, seq_len=64, split="test")
