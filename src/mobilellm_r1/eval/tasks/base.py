"""What a benchmark is to the runner: examples, a prompt per example, stop strings, and a scorer.

A task reads its examples from a local JSONL/Parquet file (``--data PATH``) or, for users with internet,
from the Hugging Face hub (``hf:NAME[:CONFIG][@SPLIT]``). Two prompt styles follow the paper's evaluation:
``base`` (few-shot plain text, for pre-trained models: Table 6) and ``chat`` (0-shot in the chat template
with the task's system prompt, for post-trained models: Table 7).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_SYSTEM = ("You are a helpful and harmless assistant. You should think step-by-step before responding to "
               "the instruction below. Please use python programming language only.")


class TaskDataError(ValueError):
    """A task file that cannot be read as that task's data (names the file, line and field)."""


@dataclass
class Example:
    id: str
    fields: dict[str, Any]  # the row as read
    gold: Any


@dataclass
class Prompt:
    text: str | None = None  # plain-text prompt (base style)
    messages: list[dict] | None = None  # chat messages (chat style); rendered with the tokenizer's template


@dataclass
class Task:
    name: str
    required: tuple[str, ...]  # fields every row must have
    gold_field: str
    id_field: str | None
    build_prompt: Callable[["Task", Example, str], Prompt]
    score: Callable[[str, Example], dict[str, Any]]  # completion -> {"correct": bool, ...}
    stop: dict[str, list[str]] = field(default_factory=dict)  # per style
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    default_samples: int = 1  # pass@1 is averaged over this many samples per problem (AIME: 64)
    default_data: str = ""  # a file name looked for in ../shared/data/benchmarks-like folders
    hub: str = ""  # hf:NAME[:CONFIG][@SPLIT] for users with internet
    fewshot: list[dict] = field(default_factory=list)
    check_row: Callable[[dict], str | None] | None = None  # beyond required fields: a problem with the row, or None

    def stops(self, style: str) -> list[str]:
        return self.stop.get(style, [])


def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` from JSONL (optionally .gz) or Parquet; a malformed line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task data not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


def load_examples(task: Task, path: str | Path, limit: int = 0) -> list[Example]:
    """The task's examples from ``path``; every row must carry the task's required fields."""
    if str(path).startswith("hf:"):
        rows = enumerate(_hub_rows(str(path)), 1)
        where = str(path)
    else:
        rows = read_rows(path)
        where = str(path)
    out = []
    for line, row in rows:
        for f in task.required:
            if f not in row or row[f] is None:
                raise TaskDataError(f"{where}:{line}: missing field {f!r} (task {task.name} needs "
                                    f"{', '.join(task.required)})")
        problem = task.check_row(row) if task.check_row else None
        if problem:
            raise TaskDataError(f"{where}:{line}: {problem}")
        ex_id = str(row[task.id_field]) if task.id_field and task.id_field in row else str(line - 1)
        out.append(Example(id=ex_id, fields=row, gold=row.get(task.gold_field)))
        if limit and len(out) >= limit:
            break
    if not out:
        raise TaskDataError(f"{where}: no examples")
    return out


def _hub_rows(spec: str) -> Iterator[dict]:
    from ...data.sources import hf_rows  # the streaming reader tokenization uses (needs internet)

    try:
        yield from hf_rows(spec)
    except (OSError, ImportError) as e:  # offline, or no `datasets`: a data problem the caller can skip on
        raise TaskDataError(f"{spec}: cannot be read from the hub ({type(e).__name__}: {e}); pass a local "
                            "file with --data") from None
