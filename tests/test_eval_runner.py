"""The evaluation runner end to end with a real model (SmolLM2-135M-Instruct from its GGUF) and real task
files: per-sample records, resume, summaries, and bad task files."""

import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli
from mobilellm_r1.eval.grading.math import grade, has_boxed_answer
from mobilellm_r1.eval.runner import EvalConfig, run_eval, summarize
from mobilellm_r1.eval.tasks.base import TaskDataError


@pytest.fixture(scope="module")
def smollm2():
    from mobilellm_r1.assets import smollm2_gguf

    try:
        smollm2_gguf(fetch=False)
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF asset missing")
    return "smollm2"


def _gsm8k_file(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
             "answer": "Tom has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
            {"question": "A box holds 4 pens. How many pens are in 3 boxes?", "answer": "4 * 3 = 12\n#### 12"},
            {"question": "Sara had 10 dollars and spent 4. How many dollars are left?", "answer": "10 - 4 = 6\n#### 6"}]
    path = tmp_path / "gsm8k_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_chat_run_writes_records_and_resumes(smollm2, tmp_path):
    data = _gsm8k_file(tmp_path)
    cfg = EvalConfig(task="gsm8k", data=str(data), out=str(tmp_path / "out"), style="chat", max_new_tokens=96,
                     batch_size=3, progress=False)
    res = run_eval(smollm2, cfg)
    recs = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and res["n"] == 3 and res["generated_samples"] == 3
    gold = {"0": "5", "1": "12", "2": "6"}
    for r in recs:
        assert r["completion"].strip() and r["new_tokens"] > 0
        assert r["correct"] == grade(r["completion"], gold[r["id"]])["correct"]  # the verdict is the grader's
        assert r["boxed"] == has_boxed_answer(r["completion"])
    assert res["pass@1"] == pytest.approx(sum(r["correct"] for r in recs) / 3)
    assert res["format_rate"] == pytest.approx(sum(r["boxed"] for r in recs) / 3)
    lo, hi = res["ci95"]
    assert 0.0 <= lo <= res["pass@1"] <= hi <= 1.0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pass@1"] == res["pass@1"]
    again = run_eval(smollm2, cfg)  # every sample is on disk: nothing is generated twice
    assert again["generated_samples"] == 0 and again["pass@1"] == res["pass@1"]


def test_several_samples_per_problem_average_per_problem():
    recs = [{"id": "a", "correct": True}, {"id": "a", "correct": False}, {"id": "b", "correct": True},
            {"id": "b", "correct": True}]
    s = summarize(recs, 2)
    assert s["pass@1"] == pytest.approx(0.75) and s["n"] == 2 and s["samples"] == 4
    assert s["format_rate"] is None  # no format field (code tasks, old samples): no rate, not 0
    boxed = [dict(r, boxed=b) for r, b in zip(recs, (True, False, False, False))]
    assert summarize(boxed, 2)["format_rate"] == pytest.approx(0.25)


@pytest.mark.parametrize("text,boxed", [("so \\boxed{42}.", True), ("\\fbox{x+1}", True), ("\\boxed 7", True),
                                        ("\\boxed{}", False), ("\\boxed{4", False), ("The answer is 42.", False),
                                        ("\n\n\n", False)])
def test_has_boxed_answer(text, boxed):
    assert has_boxed_answer(text) is boxed


def test_task_file_with_a_missing_field_names_line_and_field(smollm2, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q1", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(TaskDataError, match=r"bad.jsonl:2: missing field 'answer'"):
        run_eval(smollm2, EvalConfig(task="gsm8k", data=str(path), out=str(tmp_path / "o"), progress=False))
    r = run_cli("eval", "--model", smollm2, "--task", "gsm8k", "--data", path, "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "bad.jsonl:2: missing field 'answer'" in r.stderr
    r = run_cli("eval", "--model", smollm2, "--task", "nope", "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "unknown task 'nope'" in r.stderr


def test_real_gsm8k_base_prompt_uses_train_exemplars(shared_benchmarks):
    from mobilellm_r1.eval.tasks.base import load_examples
    from mobilellm_r1.eval.tasks.math_tasks import TASKS, gsm8k_exemplars

    import dataclasses

    test = shared_benchmarks / "gsm8k_test.jsonl"
    shots = gsm8k_exemplars(test)
    assert len(shots) == 8 and all("<<" not in s["answer"] and s["answer"].endswith(".") for s in shots)
    task = dataclasses.replace(TASKS["gsm8k"], fewshot=shots)
    ex = load_examples(task, test, limit=2)
    p = task.build_prompt(task, ex[0], "base").text
    assert p.count("Question:") == 9 and p.endswith(f"Question: {ex[0].fields['question']}\nAnswer:")
    assert "The answer is" in p


def test_code_tasks_grade_real_programs_in_the_sandbox(tmp_path):
    """MBPP and stdin/stdout rows in their real field formats, scored on hand-written right and wrong
    solutions (the scorer is what a model's completion goes through)."""
    from mobilellm_r1.eval.tasks.base import load_examples
    from mobilellm_r1.eval.tasks.code_io import TASKS as IO
    from mobilellm_r1.eval.tasks.mbpp import TASKS as MBPP

    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"task_id": 11, "text": "Write a function to add two numbers.",
                                "code": "def add(a, b):\n    return a + b", "test_setup_code": "",
                                "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}) + "\n")
    task = MBPP["mbpp"]
    ex = load_examples(task, mbpp)[0]
    assert "[BEGIN]" in task.build_prompt(task, ex, "base").text
    assert task.score("def add(a, b):\n    return a + b\n[DONE]", ex)["correct"]
    assert not task.score("def add(a, b):\n    return a - b\n[DONE]", ex)["correct"]

    lcb = tmp_path / "lcb.jsonl"
    cases = json.dumps([{"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"},
                        {"input": "1\n5\n", "output": "5\n", "testtype": "stdin"}])
    lcb.write_text(json.dumps({"question_content": "Sum the numbers.", "public_test_cases": cases}) + "\n"
                   + json.dumps({"question": "No tests here."}) + "\n")
    io = IO["code_io"]
    with pytest.raises(TaskDataError, match=r"lcb.jsonl:2: no stdin/stdout test cases"):
        load_examples(io, lcb)
    ex = load_examples(io, lcb, limit=1)[0]
    good = "Here:\n```python\nn = int(input())\nprint(sum(map(int, input().split())))\n```"
    bad = "```python\nprint(0)\n```"
    assert io.score(good, ex)["correct"] and not io.score(bad, ex)["correct"]


def test_hub_data_offline_is_a_task_data_error():
    """Offline (no ../shared, no network), a hub-backed task fails as a data problem the pipeline skips."""
    code = ("from mobilellm_r1.eval.tasks.base import TaskDataError, load_examples\n"
            "from mobilellm_r1.eval.tasks.math_tasks import TASKS\n"
            "try:\n    load_examples(TASKS['gsm8k'], TASKS['gsm8k'].hub, limit=1)\n"
            "except TaskDataError as e:\n    print('SKIP', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("SKIP hf:openai/gsm8k") and "--data" in res.stdout


def test_engine_vllm_without_the_extra_is_a_clear_error(tmp_path):
    from mobilellm_r1.model.vllm_backend import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed here")
    from mobilellm_r1.eval.runner import EvalConfig, run_eval
    from mobilellm_r1.eval.tasks.base import TaskDataError

    with pytest.raises(TaskDataError, match=r"mobilellm-r1\[vllm\]"):
        run_eval("unused", EvalConfig(task="arith", engine="vllm", out=str(tmp_path)))
    with pytest.raises(TaskDataError, match="unknown engine"):
        run_eval("unused", EvalConfig(task="arith", engine="tgi", out=str(tmp_path)))
