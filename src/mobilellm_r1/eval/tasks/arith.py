"""``arith``: the multi-step arithmetic word problems of :mod:`mobilellm_r1.data.arith` as an eval task.

Offline on every machine: with no ``--data`` the task generates its held-out test split (256 problems,
levels 1-3 in equal shares) from the family's default seed, the same problems the demo's corpus holds out.
``--data FILE`` reads rows with ``problem``, ``answer`` and ``level`` (the corpus's ``arith_test.jsonl``).

Chat style (the default) asks 0-shot with the math system prompt; base style gives four worked problems
from the SFT split first. A completion is correct only when its closed ``\\boxed{}`` holds the answer (the
math grader's equivalence): the prompt asks for that format, and without it a model that echoes the
question's last number would earn credit. The summary breaks pass@1 down by level (number of steps).
"""

from __future__ import annotations

from .base import MATH_SYSTEM, Example, Prompt, Task

GENERATED = "generated:arith"


def score(completion: str, ex: Example) -> dict:
    from ..grading.math import grade_boxed

    return {**grade_boxed(completion, str(ex.gold)), "level": ex.fields.get("level"),
            "problem": ex.fields["problem"]}  # so a report can show what was asked beside what was written


def exemplars() -> list[dict]:
    from ...data.arith import ArithConfig, generate_splits

    cfg = ArithConfig(sizes={"test": 256, "grpo": 0, "sft": 4})
    return [p.row() for p in generate_splits(cfg)["sft"]]


def _prompt(task: Task, ex: Example, style: str) -> Prompt:
    q = ex.fields["problem"]
    if style == "chat":
        return Prompt(messages=[{"role": "system", "content": MATH_SYSTEM}, {"role": "user", "content": q}])
    shots = "".join(f"Question: {s['problem']}\nAnswer:\n{s['solution']}\n\n" for s in task.fewshot)
    return Prompt(text=f"{shots}Question: {q}\nAnswer:\n")


def _check(row: dict) -> str | None:
    if not str(row.get("answer", "")).strip():
        return "empty 'answer'"
    return None


TASKS = {
    "arith": Task("arith", ("problem", "answer"), "answer", "id", _prompt, score,
                  stop={"base": ["\n\nQuestion:", "Question:"], "chat": []},
                  max_new_tokens={"base": 96, "chat": 96}, check_row=_check),
}
