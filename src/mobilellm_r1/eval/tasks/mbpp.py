"""MBPP (3-shot, pass@1): the MBPP paper's prompt — the task text, its test asserts, then the solution
between ``[BEGIN]`` and ``[DONE]`` — with three solved exemplars before the question. Graded by running the
solution and the asserts (with ``test_setup_code``) in the code sandbox.

Data: HF ``mbpp`` rows (``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code``); exemplars
come from ``--fewshot``-style sibling file ``mbpp_prompt.jsonl`` (the dataset's ``prompt`` split) when it is
beside the data file, else from the hub's prompt split, else the run is 0-shot (recorded in the summary).
"""

from __future__ import annotations

from pathlib import Path

from .base import Example, Prompt, Task, read_rows
from .humaneval import extract_code


def _block(row: dict, with_code: bool) -> str:
    tests = "\n".join(row["test_list"])
    head = (f"You are an expert Python programmer, and here is your task: {row['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")
    return head + (f"{row['code']}\n[DONE]\n\n" if with_code else "")


def mbpp_exemplars(data: str | Path | None, k: int = 3) -> list[dict]:
    if not data or str(data).startswith("hf:"):
        return []
    path = Path(data).with_name("mbpp_prompt.jsonl")
    return [row for _, row in read_rows(path)][:k] if path.is_file() else []


def _prompt(task: Task, ex: Example, style: str) -> Prompt:
    shots = "".join(_block(s, True) for s in task.fewshot)
    return Prompt(text=shots + _block(ex.fields, False))


def _score(completion: str, ex: Example) -> dict:
    from ..grading.code import check_asserts

    code = extract_code(completion.split("[DONE]")[0])
    f = ex.fields
    res = check_asserts(code, list(f["test_list"]), setup=f.get("test_setup_code") or "", timeout=10.0)
    return {"correct": res.status == "passed", "pred": res.status, "gold": None, "detail": res.detail[-500:]}


TASKS = {
    "mbpp": Task("mbpp", ("task_id", "text", "test_list"), "task_id", "task_id", _prompt, _score,
                 stop={"base": ["[DONE]"], "chat": ["[DONE]"]}, max_new_tokens={"base": 512, "chat": 512},
                 hub="hf:google-research-datasets/mbpp:full@test"),
}
