"""Math benchmarks: GSM8K, MATH500, AIME, AMC — prompts as in the paper's evaluation, graded by
:mod:`mobilellm_r1.eval.grading.math`.

- ``gsm8k``: base style = 8-shot chain of thought ending "The answer is N." (exemplars drawn from the
  GSM8K train file beside the test file, calculator annotations removed); chat style = 0-shot with the
  math system prompt. Gold: the ``#### N`` at the end of ``answer``.
- ``math500``: base style = 4-shot in the Minerva format ("Problem:" / "Solution:" / "Final Answer: The
  final answer is $X$. I hope it is correct."), with four exemplars written for this project; chat style =
  0-shot ``\\boxed{}``. Gold: ``answer``.
- ``aime`` / ``amc``: chat style, pass@1 averaged over n samples (default 64 for AIME, as the paper).
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import MATH_SYSTEM, Example, Prompt, Task, read_rows

_CALC = re.compile(r"<<[^>]*>>")

# Four worked problems in the Minerva prompt format, written for this project (not from MATH's test set).
MINERVA_EXEMPLARS = [
    ("Find the value of $x$ such that $3x - 7 = 11$.",
     "Adding 7 to both sides gives $3x = 18$, so $x = 6$.\nFinal Answer: The final answer is $6$. I hope it is correct."),
    ("What is the sum of the interior angles of a hexagon, in degrees?",
     "A polygon with $n$ sides has interior angles summing to $180(n-2)$ degrees. For $n = 6$ this is "
     "$180 \\cdot 4 = 720$.\nFinal Answer: The final answer is $720$. I hope it is correct."),
    ("Simplify $\\frac{2}{3} + \\frac{1}{6}$.",
     "With the common denominator 6, $\\frac{2}{3} = \\frac{4}{6}$, so the sum is $\\frac{5}{6}$.\n"
     "Final Answer: The final answer is $\\frac{5}{6}$. I hope it is correct."),
    ("How many positive divisors does $36$ have?",
     "Since $36 = 2^2 \\cdot 3^2$, it has $(2+1)(2+1) = 9$ positive divisors.\n"
     "Final Answer: The final answer is $9$. I hope it is correct."),
]


def _score(completion: str, ex: Example) -> dict:
    from ..grading.math import grade, has_boxed_answer

    return {**grade(completion, str(ex.gold)), "boxed": has_boxed_answer(completion)}


def _chat(problem: str) -> Prompt:
    return Prompt(messages=[{"role": "system", "content": MATH_SYSTEM}, {"role": "user", "content": problem}])


def gsm8k_exemplars(test_path: str | Path | None, k: int = 8) -> list[dict]:
    """The first ``k`` rows of ``gsm8k_train.jsonl`` beside the test file (fixed, so runs compare)."""
    if not test_path or str(test_path).startswith("hf:"):
        return []
    train = Path(test_path).with_name("gsm8k_train.jsonl")
    if not train.is_file():
        return []
    out = []
    for _, row in read_rows(train):
        reasoning, _, answer = row["answer"].rpartition("####")
        out.append({"question": row["question"],
                    "answer": f"{_CALC.sub('', reasoning).strip()} The answer is {answer.strip()}."})
        if len(out) == k:
            break
    return out


def _gsm8k_prompt(task: Task, ex: Example, style: str) -> Prompt:
    q = ex.fields["question"]
    if style == "chat":
        return _chat(q)
    shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in task.fewshot)
    return Prompt(text=f"{shots}Question: {q}\nAnswer:")


def _math_prompt(task: Task, ex: Example, style: str) -> Prompt:
    p = ex.fields["problem"]
    if style == "chat":
        return _chat(p)
    shots = "".join(f"Problem:\n{q}\n\nSolution:\n{a}\n\n" for q, a in MINERVA_EXEMPLARS)
    return Prompt(text=f"{shots}Problem:\n{p}\n\nSolution:\n")


def _competition_prompt(task: Task, ex: Example, style: str) -> Prompt:
    p = ex.fields["problem"]
    return _chat(p) if style == "chat" else Prompt(text=f"Problem:\n{p}\n\nSolution:\n")


TASKS = {
    "gsm8k": Task("gsm8k", ("question", "answer"), "answer", None, _gsm8k_prompt, _score,
                  stop={"base": ["\n\nQuestion:", "Question:"], "chat": []},
                  max_new_tokens={"base": 256, "chat": 1024}, default_data="gsm8k_test.jsonl",
                  hub="hf:openai/gsm8k:main@test"),
    "math500": Task("math500", ("problem", "answer"), "answer", "unique_id", _math_prompt, _score,
                    stop={"base": ["\n\nProblem:", "I hope it is correct."], "chat": []},
                    max_new_tokens={"base": 512, "chat": 2048}, default_data="math500_test.jsonl",
                    hub="hf:HuggingFaceH4/MATH-500@test"),
    "aime": Task("aime", ("problem", "answer"), "answer", "id", _competition_prompt, _score,
                 stop={"base": ["\n\nProblem:"]}, max_new_tokens={"base": 1024, "chat": 4096},
                 default_samples=64, default_data="aime24_test.jsonl", hub="hf:HuggingFaceH4/aime_2024@train"),
    "amc": Task("amc", ("problem", "answer"), "answer", "id", _competition_prompt, _score,
                stop={"base": ["\n\nProblem:"]}, max_new_tokens={"base": 1024, "chat": 4096},
                default_samples=8, default_data="amc23_test.jsonl"),
}
