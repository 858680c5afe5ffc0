"""Dataset rows → conversations (lists of ``{"role", "content"}``), one detector per common SFT format.

Formats are detected per row, in this order:

- ``messages``: a list of ``{"role", "content"}`` (Tulu-3, NuminaMath-TIR, our embedded chat corpus);
- ``problem`` + ``generated_solution`` (OpenMathReasoning) or ``problem`` + ``solution``;
- ``input`` + ``output`` (OpenCodeReasoning, OpenScienceReasoning);
- ``question`` + ``answer`` with a GSM8K ``#### N`` line (its calculator annotations ``<<..>>`` removed and
  the final line rewritten as ``\\boxed{N}``, the answer format of the reasoning data and the evaluation).

A plain document (a ``text`` field and none of the fields above, :func:`is_text_row`) is not a conversation:
SFT trains on all of it (``sft_data``).

A row that matches none is an error naming the file and line: silently training on nothing would hide a
wrong ``datasets`` entry.
"""

from __future__ import annotations

import re
from typing import Any

from ..eval.tasks.base import CODE_SYSTEM, MATH_SYSTEM

ROLES = ("system", "user", "assistant", "tool", "ipython")
_CALC = re.compile(r"<<[^>]*>>")


# (prompt field, answer field, kind) of the flat formats, in the order row_messages tries them
PAIR_FORMATS = (("problem", "generated_solution", "math"), ("problem", "solution", "math"),
                ("input", "output", "code"), ("question", "answer", "gsm8k"))
# a row with a text field and any of these is ambiguous, not a plain document (row_messages rejects it)
_CONVERSATION_FIELDS = {"messages", "prompt", "completion", "response"} | {f for p, a, _ in PAIR_FORMATS for f in (p, a)}


def is_text_row(row: Any) -> bool:
    """A plain document: a ``text`` string and no field of a conversation format."""
    return isinstance(row, dict) and isinstance(row.get("text"), str) and not (_CONVERSATION_FIELDS & set(row))


class SFTFormatError(ValueError):
    """A row no SFT format matches (names the file, line and the fields it has)."""


def gsm8k_solution(answer: str) -> str | None:
    """A GSM8K ``answer`` (worked steps, then ``#### N``) as a solution ending in ``\\boxed{N}``."""
    steps, sep, final = answer.rpartition("####")
    final = final.strip().replace(",", "")
    if not sep or not final:
        return None
    return f"{_CALC.sub('', steps).strip()}\nThe final answer is $\\boxed{{{final}}}$."


def _system(kind: str, system_prompt: str) -> list[dict]:
    if system_prompt == "none":
        return []
    if system_prompt == "auto":
        text = {"math": MATH_SYSTEM, "code": CODE_SYSTEM}.get(kind, "")
        return [{"role": "system", "content": text}] if text else []
    return [{"role": "system", "content": system_prompt}]


def row_messages(row: Any, where: str, system_prompt: str = "auto") -> list[dict]:
    """The conversation of one dataset row; raises :class:`SFTFormatError` naming ``where``."""
    if not isinstance(row, dict):
        raise SFTFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    msgs = row.get("messages")
    if msgs is not None:
        if not isinstance(msgs, list):
            raise SFTFormatError(f"{where}: field 'messages' must be a list, got {type(msgs).__name__}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise SFTFormatError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, "
                                     f"got {str(m)[:120]!r}")
            out.append({"role": m["role"], "content": m["content"]})
        if system_prompt not in ("auto", "none") and not any(m["role"] == "system" for m in out):
            out = _system("", system_prompt) + out
        return out
    for prompt_key, answer_key, kind in PAIR_FORMATS:
        p, a = row.get(prompt_key), row.get(answer_key)
        if isinstance(p, str) and isinstance(a, str):
            if kind == "gsm8k":
                a = gsm8k_solution(a)
                if a is None:
                    raise SFTFormatError(f"{where}: 'answer' has no GSM8K '#### N' final line")
                kind = "math"
            elif kind == "code" and "```" not in a:  # OpenScienceReasoning: input/output, but a boxed answer
                kind = "math"
            return _system(kind, system_prompt) + [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
    raise SFTFormatError(f"{where}: no SFT format matches this row (fields: {', '.join(sorted(row)) or 'none'}); "
                         "expected 'messages', 'problem'+'generated_solution', 'problem'+'solution', "
                         "'input'+'output' or 'question'+'answer'")


def prompt_and_answer(row: Any, where: str) -> tuple[list[dict], str]:
    """A GRPO prompt (the conversation up to its last assistant turn, which is dropped) and the gold
    answer: ``answer`` when the row has one, else the reference solution (graded by its ``\\boxed{}``)."""
    msgs = row_messages(row, where)
    cut = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    prompt = msgs[:cut] if cut is not None else msgs
    gold = row.get("expected_answer") or row.get("answer") if isinstance(row, dict) else None
    if isinstance(gold, str) and "####" in gold:
        gold = gold.rpartition("####")[2].strip().replace(",", "")
    if not isinstance(gold, (str, int, float)) or gold == "":
        gold = msgs[cut]["content"] if cut is not None else None
    if gold is None or not any(m["role"] == "user" for m in prompt):
        raise SFTFormatError(f"{where}: a GRPO prompt needs a user turn and a gold answer or solution")
    return prompt, str(gold)
