"""Competitive-programming problems judged on stdin/stdout (LiveCodeBench-style), pass@1.

Chat style (the post-trained models' evaluation): the problem statement with the code system prompt and
an instruction to read stdin and write stdout; the first fenced Python block of the reply is run on every
test case in the code sandbox and must print exactly the expected output (trailing whitespace ignored).

Rows: ``question`` (or LiveCodeBench's ``question_content``) and ``tests`` — a list of ``{"input",
"output"}`` — or LiveCodeBench's ``public_test_cases`` / ``private_test_cases`` (JSON strings of such lists;
only ``testtype == "stdin"`` cases are used).
"""

from __future__ import annotations

import json

from .base import CODE_SYSTEM, Example, Prompt, Task
from .humaneval import extract_code

INSTRUCTION = ("Read the inputs from stdin, solve the problem and write the answer to stdout. "
               "Enclose your code within a ```python code block.")


def test_cases(row: dict) -> list[tuple[str, str]]:
    cases = row.get("tests")
    if cases is None:
        cases = []
        for key in ("public_test_cases", "private_test_cases"):
            raw = row.get(key)
            if raw:
                cases += json.loads(raw) if isinstance(raw, str) else list(raw)
        cases = [c for c in cases if c.get("testtype", "stdin") == "stdin"]
    return [(c["input"], c["output"]) for c in cases]


def _check(row: dict) -> str | None:
    if not _question(row):
        return "missing field 'question' (or 'question_content')"
    try:
        cases = test_cases(row)
    except (KeyError, TypeError, ValueError) as e:
        return f"unreadable test cases ({type(e).__name__}: {e})"
    return None if cases else "no stdin/stdout test cases ('tests', or 'public_test_cases')"


def _question(row: dict) -> str:
    return row.get("question") or row.get("question_content") or ""


def _prompt(task: Task, ex: Example, style: str) -> Prompt:
    q = _question(ex.fields)
    if style == "chat":
        return Prompt(messages=[{"role": "system", "content": CODE_SYSTEM},
                                {"role": "user", "content": f"{q}\n\n{INSTRUCTION}"}])
    return Prompt(text=f"{q}\n\n{INSTRUCTION}\n```python\n")


def _score(completion: str, ex: Example) -> dict:
    from ..grading.code import check_io

    res = check_io(extract_code(completion), test_cases(ex.fields), timeout=10.0)
    return {"correct": res.status == "passed", "pred": res.status, "gold": None, "detail": res.detail[-500:]}


TASKS = {
    "code_io": Task("code_io", (), "question", None, _prompt, _score, stop={"base": ["```"], "chat": []},
                    max_new_tokens={"base": 1024, "chat": 4096}, hub="hf:livecodebench/code_generation_lite",
                    check_row=_check),
}
