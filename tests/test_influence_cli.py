"""The influence commands end to end on real files: `influence score` (JSONL training data, a model
checkpoint) -> `mix`; LOO (Eq. 1) and co-evolution (Eq. 7-8) on real token shards at the micro preset;
the scorer under torchrun (2 gloo ranks) equals the single process."""

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli, run_cli_json

MICRO = """[run]
name = "t"
seed = 0
[model]
preset = "micro"
vocab_size = 49152
bos_id = 0
eos_ids = [0]
pad_id = 2
[data]
tokenizer = "smollm2"
shards_dir = "{shards}"
[[data.sources]]
name = "code"
[[data.sources]]
name = "mail"
[stages.pre]
kind = "pretrain"
steps = 2
seq_len = 32
[stages.pre.mixture]
code = 0.5
mail = 0.5
[influence]
probes = "{probes}"
probe_samples = 4
train_samples = 3
seq_len = 32
batch_size = 4
loo_steps = 3
loo_batch = 2
loo_eval_every = 2
coevolve_pool = 4
coevolve_steps = 2
coevolve_max_phases = 2
coevolve_threshold = 0.0
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mobilellm_r1.data.shards import TokenizeOptions, tokenize_sources

    root = tmp_path_factory.mktemp("infl")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    groups = {"code": sorted(stdlib.glob("[a-f]*.py"))[:8], "mail": sorted(stdlib.glob("email/*.py"))[:8]}
    inputs = {}
    for name, files in groups.items():
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": f.read_text()[:3000]}) + "\n" for f in files))
        inputs[name] = [str(p)]
    tokenize_sources(inputs, root / "shards", TokenizeOptions(tokenizer="smollm2", workers=1, progress=False))
    probes = root / "probes"
    probes.mkdir()
    docs = {"code": sorted(stdlib.glob("json/*.py")), "math": sorted(stdlib.glob("statistics.py")) + [stdlib / "fractions.py"],
            "knowledge": sorted(stdlib.glob("html/*.py"))}
    for cap, files in docs.items():
        (probes / f"{cap}.jsonl").write_text("".join(json.dumps({"text": f.read_text()[:1500]}) + "\n" for f in files))
    recipe = root / "recipe.toml"
    recipe.write_text(MICRO.format(shards=root / "shards", probes=probes))
    ckpt = root / "init"
    run_cli("model", "init", "--preset", "micro", "--vocab-size", "49152", "--tokenizer", "smollm2", "--out", ckpt)
    return root, recipe, ckpt, probes


def test_score_then_mix(data, tmp_path):
    root, recipe, ckpt, probes = data
    res = run_cli_json("influence", "score", "--checkpoints", ckpt, "--train", root / "code.jsonl", root / "mail.jsonl",
                       "--probes", probes, "--out", tmp_path / "s", "--recipe", recipe)
    assert res["samples"] == 6 and set(res["sources"]) == {"code", "mail"}
    lines = (tmp_path / "s" / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(np.isfinite(json.loads(x)["joint"]) for x in lines)
    m = run_cli_json("mix", "--scores", tmp_path / "s", "--out", tmp_path / "mix.toml", "--stage", "pre")
    got = tomllib.loads((tmp_path / "mix.toml").read_text())["stages"]["pre"]["mixture"]
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-5) and got.keys() == m["weights"].keys()
    bad = run_cli("influence", "score", "--checkpoints", ckpt, "--train", root / "code.jsonl", "--probes",
                  tmp_path / "nowhere", "--out", tmp_path / "x", check=False)
    assert bad.returncode == 2 and "code.jsonl" in bad.stderr


@pytest.mark.slow
def test_loo_and_coevolve(data, tmp_path):
    root, recipe, ckpt, probes = data
    loo = run_cli_json("loo", "--recipe", recipe, "--out", tmp_path / "loo")
    assert set(loo["delta_l"]) == {"code", "mail"}
    assert all(set(v) == {"code", "math", "knowledge"} for v in loo["delta_l"].values())
    full = json.loads((tmp_path / "loo" / "loo.json").read_text())
    assert full["runs"]["all"]["steps"] == 3 and set(full["runs"]) == {"all", "code", "mail"}
    co = run_cli_json("coevolve", "--recipe", recipe, "--out", tmp_path / "co", "--init", ckpt)
    data_ = json.loads((tmp_path / "co" / "coevolve.json").read_text())
    ph = data_["phases"][0]
    assert ph["pool"] == 8 and sum(ph["histogram"]["counts"]) == 8
    assert len(ph["retained"]) == sum(1 for j in ph["joint"] if j > 0)
    assert co["phases"][0]["retained"] == len(ph["retained"])


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(data, tmp_path):
    root, recipe, ckpt, probes = data
    args = ["influence", "score", "--checkpoints", str(ckpt), "--train", str(root / "shards"), "--probes", str(probes),
            "--recipe", str(recipe)]
    run_cli(*args, "--out", tmp_path / "one", "--json")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "mobilellm_r1", *args,
                    "--out", str(tmp_path / "two"), "--json"], check=True, capture_output=True, env=env, timeout=600)
    one = [json.loads(x) for x in (tmp_path / "one" / "scores.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "scores.jsonl").read_text().splitlines()]
    assert [(r["source"], r["index"]) for r in one] == [(r["source"], r["index"]) for r in two]
    np.testing.assert_allclose([r["joint"] for r in one], [r["joint"] for r in two], rtol=1e-4)


def test_figure7_script_trains_both_arms_on_the_same_budget(data, tmp_path):
    """benchmarks/figure7.py end to end at a toy size: warm-up -> influence -> Eq. 6 -> two arms -> NLL table.
    An empty --benchmarks dir exercises the clean skip of GSM8K / MATH500."""
    root, recipe, ckpt, probes = data
    (tmp_path / "bench").mkdir()
    args = [sys.executable, str(REPO / "benchmarks" / "figure7.py"), "--shards", str(root / "shards"),
            "--out", str(tmp_path / "f7"), "--sources", "code", "mail", "--probes", str(probes),
            "--knowledge-source", "mail", "--warmup-steps", "2", "--checkpoints", "2", "--steps", "2",
            "--batch", "2", "--seq-len", "32", "--train-samples", "2", "--probe-samples", "2", "--eval-docs", "2",
            "--knowledge-tokens", "64", "--heldout-fraction", "0.1", "--benchmarks", str(tmp_path / "bench"), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert set(out["nll"]) == {"uniform", "influence"}
    assert set(out["nll"]["uniform"]) == {"code/humaneval", "knowledge/mail_heldout"}
    assert out["meta"]["math_sets_skipped"] == ["gsm8k", "math500"]
    assert all(np.isfinite(v) and v > 0 for arm in out["nll"].values() for v in arm.values())
    assert sum(out["weights"].values()) == pytest.approx(1.0) and set(out["weights"]) == {"code", "mail"}
    for arm in ("uniform", "influence_arm"):  # the same token budget: the same number of steps
        state = json.loads((tmp_path / "f7" / arm / "final" / "trainer_state.json").read_text())
        assert state["step"] == 2
    assert (tmp_path / "f7" / "figure7.md").read_text().count("|") > 10
