"""The arith task family: generator, splits, grading, contamination check, eval task, GRPO reward."""

from __future__ import annotations

import json
import re

import pytest

from mobilellm_r1.data.arith import SPLITS, ArithConfig, contamination, generate_splits, heldout_rows
from mobilellm_r1.eval.grading.math import grade, has_boxed_answer

SMALL = ArithConfig(sizes={"test": 60, "grpo": 60, "sft": 600, "pretrain": 300})


@pytest.fixture(scope="module")
def splits():
    return generate_splits(SMALL)


def test_generator_is_deterministic_per_seed(splits):
    again = generate_splits(SMALL)
    assert [p.row() for s in SPLITS for p in splits[s]] == [p.row() for s in SPLITS for p in again[s]]
    other = generate_splits(ArithConfig(seed=SMALL.seed + 1, sizes=SMALL.sizes))
    assert [p.problem for p in other["test"]] != [p.problem for p in splits["test"]]
    assert heldout_rows() == heldout_rows() and len(heldout_rows()) == 256  # the eval task's default split


def test_splits_are_disjoint_in_text_and_computation(splits):
    from mobilellm_r1.data.arith import _signature

    texts = [p.problem for s in SPLITS for p in splits[s]]
    assert len(texts) == len(set(texts))
    test_sigs = {_signature(p) for p in splits["test"]}
    assert len(test_sigs) == len(splits["test"])
    assert not any(_signature(p) in test_sigs for s in SPLITS[1:] for p in splits[s])
    for s in SPLITS:  # every level in equal shares (the sizes are multiples of 3)
        levels = [p.level for p in splits[s]]
        assert {lv: levels.count(lv) for lv in (1, 2, 3)} == {lv: len(levels) // 3 for lv in (1, 2, 3)}


def test_drill_is_the_tasks_fact_table_and_no_problem(splits):
    """The drill source holds exactly the one-step computations problems contain (every step of every split
    is in the table, and every drilled line is a table fact with its right result), one per line."""
    from mobilellm_r1.data.arith import fact_table, iter_drill_docs

    table = set(fact_table(SMALL))
    assert {st for s in SPLITS for p in splits[s] for st in p.steps} <= table
    docs = list(iter_drill_docs(SMALL, docs=50, per_doc=32))
    assert docs == list(iter_drill_docs(SMALL, docs=50, per_doc=32)) and len(docs) == 50
    ops_seen = []
    for d in docs:
        lines = d["text"].split("\n")
        assert len(lines) == 32
        for line in lines:
            a, op, b, eq, r = line.split(" ")
            assert eq == "=" and (op, int(a), int(b), int(r)) in table
            ops_seen.append(op)
    # operations drawn uniformly, not by table size (*, / are small; drilling every fact equally scored worse:
    # recipes/tiny.toml, arith_drill): 400 of 1,600 lines each, give or take sampling noise
    assert {op: ops_seen.count(op) for op in "+-*/"} == pytest.approx(dict.fromkeys("+-*/", 400), rel=0.2)


def test_every_answer_grades_correct_against_its_solution(splits):
    from mobilellm_r1.eval.tasks.arith import score
    from mobilellm_r1.eval.tasks.base import Example

    eq = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")
    for s in SPLITS:
        for p in splits[s]:
            assert grade(p.solution, str(p.answer))["correct"] and has_boxed_answer(p.solution)
            ex = Example(p.id, p.row(), str(p.answer))
            assert score(p.solution, ex)["correct"]
            lines = p.solution.splitlines()
            assert len(lines) == p.level + 1
            v = None
            for line in lines[:-1]:  # each step is a true equation chained on the previous result
                a, op, b, r = eq.match(line).groups()
                a, b, r = int(a), int(b), int(r)
                assert v is None or a == v
                assert r == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and (op != "/" or a % b == 0)
                assert 2 <= r <= SMALL.max_result
                v = r
            assert v == p.answer and str(p.answer) in lines[-1]


def test_score_requires_a_closed_box():
    from mobilellm_r1.eval.tasks.arith import score
    from mobilellm_r1.eval.tasks.base import Example
    from mobilellm_r1.posttrain.grpo import math_reward

    ex = Example("x", {"problem": "p", "answer": "12", "level": 1}, "12")
    assert score("5 + 7 = 12\nThe answer is \\boxed{12}.", ex)["correct"]
    assert not score("5 + 7 = 12\nThe answer is 12.", ex)["correct"]  # right number, no format
    assert not score("5 + 7 = 12\nThe answer is \\boxed{12", ex)["correct"]  # truncated: box never closed
    assert math_reward("The answer is \\boxed{12}.", "12") == 1.0
    assert math_reward("so 3 + 9 = 12", "12") == 0.0 and math_reward("\\boxed{13}", "12") == 0.0


def test_contamination_finds_a_planted_test_problem(tmp_path, splits):
    test = [p.problem for p in splits["test"]]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"text": p.problem}) + "\n" for p in splits["sft"]))
    res = contamination(test, [clean])
    assert res["found"] == 0 and res["checked"] == len(test) and res["files"] == 1
    dirty = tmp_path / "dirty.jsonl"
    dirty.write_text(json.dumps({"text": "Intro. " + test[7] + " More text."}) + "\n")
    res = contamination(test, [clean, dirty])
    assert res["found"] == 1 and res["where"] == {test[7]: "dirty.jsonl"}


def test_corpus_builds_the_splits_and_refuses_a_leak(tmp_path):
    from mobilellm_r1.data.corpus import build_corpus, check_arith_test

    man = build_corpus(tmp_path, sources=["arith_sft", "arith_test"], progress=False)
    assert man["run"]["arith_contamination"]["found"] == 0
    rows = [json.loads(x) for x in (tmp_path / "arith_test.jsonl").read_text().splitlines()]
    assert [r["problem"] for r in rows] == [r["problem"] for r in heldout_rows()]
    with (tmp_path / "arith_sft.jsonl").open("a") as f:  # a test problem slips into a training source
        f.write(json.dumps({"id": "leak", "text": rows[3]["problem"]}) + "\n")
    man["sources"]["arith_sft"]["status"] = "ok"
    with pytest.raises(ValueError, match=r"1 arith test problems occur in training sources .*arith_sft.jsonl"):
        check_arith_test(tmp_path, man)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="unknown arith split 'dev'"):
        generate_splits(ArithConfig(sizes={"dev": 3}))
    with pytest.raises(ValueError, match="cannot draw"):
        generate_splits(ArithConfig(levels=(1,), max_value=3, max_result=6, sizes={"test": 500}))


def test_eval_task_reports_levels_offline(tmp_path):
    """`eval --task arith` on a real model with no data given: the generated test split, graded, per level."""
    from mobilellm_r1.eval.runner import EvalConfig, run_eval

    res = run_eval("smollm2", EvalConfig(task="arith", out=str(tmp_path / "ev"), limit=6, max_new_tokens=24,
                                         batch_size=6, progress=False))
    assert res["style"] == "chat" and res["n"] == 6 and res["data"] == "generated:arith"
    assert set(res["by_level"]) == {"1", "2", "3"} and all(v["n"] == 2 for v in res["by_level"].values())
    lo, hi = res["ci95"]
    assert 0.0 <= lo <= res["pass@1"] <= hi <= 1.0 and hi > 0  # Wilson: never a point interval
    recs = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert all(r["problem"] and r["level"] in (1, 2, 3) for r in recs)


def test_wilson_interval():
    from mobilellm_r1.eval.runner import summarize, wilson

    lo, hi = wilson(0, 256)
    assert lo == 0.0 and 0.01 < hi < 0.02
    lo, hi = wilson(64, 256)
    assert 0.19 < lo < 0.21 and 0.3 < hi < 0.32
    s = summarize([{"id": str(i), "correct": i < 3, "level": 1 + i % 2} for i in range(10)], 10)
    assert s["pass@1"] == 0.3 and s["by_level"]["1"]["n"] == 5 and s["by_level"]["1"]["pass@1"] == 0.4



def test_sft_lifts_pass_at_1_and_grpo_keeps_it_micro(tmp_path):
    """The demo's post-training at micro scale on a one-step slice of the family (operands <= 8): a 400-id
    BPE trained here keeps the head small, so SFT and GRPO take seconds. A model that has not learned the
    format scores 0 (the answer must be boxed); SFT teaches the format and lifts held-out pass@1 above 0;
    GRPO samples the task's prompts, rewards only boxed right answers, logs truncation per step and keeps
    the format (measured: held-out pass@1 0 -> 5/60 -> 5/60). GRPO's lr is the demo's 1e-4: at 1e-3 an AVX2
    host's run lost all 5 (0/60) and at 3e-4 three, while an AVX-512 host's kept them. That GRPO *raises* held-out pass@1 is not
    asserted: at operands <= 6 its reward moved 0.20 -> 0.23 over 20 steps at lr 1e-3 and 0.18 -> 0.18 over
    40 at 3e-3, within noise (issue 16's note)."""
    from mobilellm_r1.config import recipe_from_dict
    from mobilellm_r1.eval.runner import EvalConfig, run_eval
    from mobilellm_r1.posttrain.grpo import GRPOOptions, train_grpo
    from mobilellm_r1.tokenizer import train_bpe
    from mobilellm_r1.train.loop import TrainOptions, train_stage

    cfg = ArithConfig(levels=(1,), max_value=8, max_result=16, sizes={"test": 60, "grpo": 200, "sft": 1500})
    sp = generate_splits(cfg)
    for name in ("test", "grpo", "sft"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(p.row()) + "\n" for p in sp[name]))
    tok = train_bpe([p.problem + "\n" + p.solution for p in sp["sft"]], tmp_path / "bpe", vocab_size=400, name="a")
    model = {"preset": "micro", "dim": 64, "n_layers": 2, "ffn_dim": 192, "vocab_size": tok.vocab_size,
             "bos_id": tok.bos_id, "eos_ids": tok.eos_ids, "pad_id": tok.pad_id, "max_seq_len": 256}
    sysmsg = "Please reason step by step, and put your final answer within \\boxed{}."
    data = {"tokenizer": str(tmp_path / "bpe"),
            "sources": [{"name": n, "paths": [str(tmp_path / f"{n}.jsonl")]} for n in ("sft", "grpo")]}
    rec = recipe_from_dict({
        "run": {"name": "m", "seed": 0}, "model": model, "data": data,
        "stages": {"sft": {"kind": "sft", "steps": 200, "seq_len": 128, "micro_batch_size": 8, "lr": 1e-2,
                           "warmup_steps": 5, "weight_decay": 0.0, "datasets": ["sft"], "system_prompt": sysmsg},
                   "grpo": {"kind": "grpo", "steps": 12, "seq_len": 128, "lr": 1e-4, "micro_batch_size": 64,
                            "init_from": "sft", "schedule": "constant", "weight_decay": 0.0, "datasets": ["grpo"],
                            "system_prompt": sysmsg,
                            "grpo": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 24,
                                     "max_prompt_tokens": 96}}}}, "m")

    def held_out(ckpt, tag):
        return run_eval(str(ckpt), EvalConfig(task="arith", data=str(tmp_path / "test.jsonl"), out=str(tmp_path / tag),
                                              max_new_tokens=24, batch_size=60, progress=False))

    first = train_stage(rec, "sft", TrainOptions(out=str(tmp_path / "sft0"), max_steps=1, progress=False))
    base = held_out(first["checkpoint"], "base")  # one update from a random init: no format yet
    train_stage(rec, "sft", TrainOptions(out=str(tmp_path / "sft"), progress=False))
    sft = held_out(tmp_path / "sft" / "final", "sft")
    res = train_grpo(rec, "grpo", GRPOOptions(out=str(tmp_path / "grpo"), progress=False))
    final = held_out(tmp_path / "grpo" / "final", "final")
    r = res["reward_mean"]
    assert base["pass@1"] == 0 and base["format_rate"] == 0
    assert sft["format_rate"] >= 0.9 and sft["pass@1"] > base["pass@1"]
    assert len(r) == len(res["truncated"]) == 12 and all(0 <= x <= 1 for x in r + res["truncated"]) and max(r) > 0
    assert final["format_rate"] >= 0.9 and final["pass@1"] > base["pass@1"]


def test_guess_floor():
    from mobilellm_r1.data.arith import guess_floor

    assert guess_floor(["2", "3", "2", 5], ["2", "4", "2", "9"]) == {"answer": "2", "pass@1": 0.5}
    assert guess_floor([], ["1"]) == {"answer": None, "pass@1": 0.0}
