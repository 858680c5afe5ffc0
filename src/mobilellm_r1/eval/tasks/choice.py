"""Multiple-choice tasks scored by log-likelihood: the commonsense rows of the paper's Table 6 and MMLU.

A :class:`ChoiceTask` turns one data row into ``(context, choices, gold)``: the prompt, the answer texts
and the index of the right one. Each choice is scored as the continuation ``delimiter + choice`` of the
context (the delimiter is one space, as in lm-evaluation-harness), and the prediction is the choice with the
highest summed log-probability (``acc``) or the highest log-probability per character of the choice text
(``acc_norm``; lm-evaluation-harness's "byte-length" normalisation, which counts ``len(choice)`` in Python
characters, without the delimiter). Winogrande is the one task whose *context* varies per choice (the
sentence filled in with each option) while the scored text is the same; its ``context`` is then a list with
one string per choice.

Prompt formats and field names follow lm-evaluation-harness's task definitions (``lm_eval/tasks/*/*.yaml``
and their ``utils.py``) for the Hugging Face datasets named in each task's ``hub`` id; each builder's
docstring gives its format. Few-shot exemplars (``fewshot`` > 0, MMLU's default 5) are the first rows of a
separate file or split (MMLU: of the same subject), each written ``context + delimiter + gold choice``,
joined and followed by ``"\\n\\n"``, after the task's description line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .base import TaskDataError, _hub_rows, read_rows

Context = str | list[str]


class MissingField(KeyError):
    """Raised by a builder for a field the row lacks (reported as ``path:line: missing field``)."""


@dataclass(frozen=True)
class ChoiceTask:
    name: str
    required: tuple[str, ...]  # fields every row must have (checked before ``build``)
    build: Callable[[dict], tuple[Context, list[str], int]]  # row -> (context, choices, gold index)
    fewshot: int = 0  # default number of exemplars (used only when exemplar data is available)
    description: Callable[[dict], str] | None = None  # text before the exemplars and the question (MMLU)
    doc: str = ""  # one line for listings
    hub: str = ""  # hf:NAME[:CONFIG][@SPLIT] of the evaluation split
    fewshot_hub: str = ""  # hf:... of the split exemplars come from
    fewshot_key: str | None = None  # exemplars share this field's value with the question (MMLU subject)
    id_field: str | None = None
    default_data: str = ""  # file name looked for in ../shared/data/benchmarks
    delimiter: str = " "  # between context and choice

    def item(self, row: dict) -> tuple[list[str], list[str], int]:
        """``(one context per choice, continuations to score, gold)`` for a row, without exemplars."""
        ctx, choices, gold = self.build(row)
        ctxs = list(ctx) if isinstance(ctx, list) else [ctx] * len(choices)
        return ctxs, [self.delimiter + c for c in choices], gold


# --------------------------------------------------------------------------------------------- helpers


def _field(row: dict, name: str) -> Any:
    if name not in row or row[name] is None:
        raise MissingField(repr(name))
    return row[name]


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an integer") from None


def _gold_in(n: int, gold: int, what: str) -> int:
    if not 0 <= gold < n:
        raise ValueError(f"{what} points at choice {gold}, but there are {n} choices")
    return gold


def _labelled_choices(row: dict, key_field: str = "answerKey") -> tuple[list[str], int]:
    """ARC/OpenBookQA ``choices: {"text": [...], "label": ["A", ...]}`` and ``answerKey``."""
    ch = _field(row, "choices")
    if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
        raise ValueError("field 'choices' must be an object with 'text' and 'label' lists")
    texts, labels = [str(t) for t in ch["text"]], [str(x) for x in ch["label"]]
    key = str(_field(row, key_field)).strip()
    if key not in labels:
        raise ValueError(f"{key_field} {key!r} is not one of the choice labels {labels}")
    return texts, labels.index(key)


# ------------------------------------------------------------------------------------------- builders


def arc(row: dict) -> tuple[str, list[str], int]:
    """ARC-Easy / ARC-Challenge (``allenai/ai2_arc``: question, choices{text,label}, answerKey).

    Context ``"Question: {question}\\nAnswer:"``; choices are ``choices.text``; gold is the index of
    ``answerKey`` in ``choices.label`` (labels are letters, or digits for a few rows)."""
    texts, gold = _labelled_choices(row)
    return f"Question: {_field(row, 'question')}\nAnswer:", texts, gold


def boolq(row: dict) -> tuple[str, list[str], int]:
    """BoolQ (``super_glue/boolq``: passage, question, label 0/1; ``google/boolq``: answer true/false).

    Context ``"{passage}\\nQuestion: {question}?\\nAnswer:"``; choices ``["no", "yes"]``."""
    if row.get("label") is not None:
        gold = _int(row["label"], "label")
    elif row.get("answer") is not None:
        ans = row["answer"]
        gold = int(ans) if isinstance(ans, bool) else {"false": 0, "true": 1}.get(str(ans).strip().lower(), -1)
        if gold < 0:
            raise ValueError(f"answer {ans!r} is not true/false")
    else:
        raise MissingField("'label' (or 'answer')")
    text = f"{_field(row, 'passage')}\nQuestion: {_field(row, 'question')}?\nAnswer:"
    return text, ["no", "yes"], _gold_in(2, gold, "label")


def piqa(row: dict) -> tuple[str, list[str], int]:
    """PIQA (``piqa``: goal, sol1, sol2, label 0/1).

    Context ``"Question: {goal}\\nAnswer:"``; choices ``[sol1, sol2]``."""
    choices = [str(_field(row, "sol1")), str(_field(row, "sol2"))]
    return f"Question: {_field(row, 'goal')}\nAnswer:", choices, _gold_in(2, _int(row["label"], "label"), "label")


def siqa(row: dict) -> tuple[str, list[str], int]:
    """Social IQa (``social_i_qa``: context, question, answerA/B/C, label "1".."3").

    Context ``"Q: {context} {question}\\nA:"``; choices ``[answerA, answerB, answerC]``; gold ``label - 1``."""
    choices = [str(_field(row, k)) for k in ("answerA", "answerB", "answerC")]
    gold = _int(_field(row, "label"), "label") - 1
    return f"Q: {_field(row, 'context')} {_field(row, 'question')}\nA:", choices, _gold_in(3, gold, "label - 1")


def hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow artifacts removed as lm-evaluation-harness does: strip, ``" [title]"`` -> ``". "``,
    every other ``[...]`` tag dropped, double spaces collapsed once."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict) -> tuple[str, list[str], int]:
    """HellaSwag (``Rowan/hellaswag``: activity_label, ctx_a, ctx_b, ctx, endings, label "0".."3").

    Context ``clean("{activity_label}: {ctx_a} {ctx_b.capitalize()}")`` (``ctx`` when ``ctx_a``/``ctx_b``
    are absent; ``str.capitalize`` lower-cases the rest, as the harness does); choices ``clean(ending)``."""
    if row.get("ctx_a") is not None and row.get("ctx_b") is not None:
        ctx = f"{row['ctx_a']} {str(row['ctx_b']).capitalize()}"
    else:
        ctx = str(_field(row, "ctx"))
    endings = _field(row, "endings")
    if not isinstance(endings, list) or not endings:
        raise ValueError("field 'endings' must be a non-empty list")
    choices = [hellaswag_clean(str(e)) for e in endings]
    gold = _gold_in(len(choices), _int(_field(row, "label"), "label"), "label")
    return hellaswag_clean(f"{_field(row, 'activity_label')}: {ctx}"), choices, gold


def obqa(row: dict) -> tuple[str, list[str], int]:
    """OpenBookQA (``allenai/openbookqa`` main: question_stem, choices{text,label}, answerKey).

    Context is ``question_stem`` alone; choices ``choices.text``."""
    texts, gold = _labelled_choices(row)
    return str(_field(row, "question_stem")), texts, gold


def winogrande(row: dict) -> tuple[list[str], list[str], int]:
    """Winogrande (``allenai/winogrande`` winogrande_xl: sentence with one ``_``, option1, option2,
    answer "1"/"2").

    Partial evaluation: the contexts are the sentence up to the blank with each option filled in; the
    scored text (the same for both) is the rest of the sentence after the blank, stripped. So
    ``"The trophy didn't fit because _ was too big."`` gives contexts ``"The trophy didn't fit because the
    trophy"`` / ``"... the suitcase"`` and choice ``"was too big."``."""
    sentence = str(_field(row, "sentence"))
    if "_" not in sentence:
        raise ValueError("field 'sentence' has no '_' blank")
    cut = sentence.index("_")
    options = [str(_field(row, "option1")), str(_field(row, "option2"))]
    suffix = sentence[cut + 1:].strip()
    answer = str(_field(row, "answer")).strip()
    if answer not in ("1", "2"):
        raise ValueError(f"answer {answer!r} is not '1' or '2'")
    return [sentence[:cut] + o for o in options], [suffix, suffix], int(answer) - 1


LETTERS = "ABCDEFGHIJ"


def mmlu(row: dict) -> tuple[str, list[str], int]:
    """MMLU (``cais/mmlu``: question, subject, choices [4 strings], answer 0..3).

    Context ``"{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"``; choices are the
    letters, so the continuations are ``" A"`` .. ``" D"``. The description line (:func:`mmlu_description`)
    and, 5-shot, the subject's first dev questions with their answers come before it."""
    choices = _field(row, "choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise ValueError("field 'choices' must be a list of 2 to 10 answers")
    ans = _field(row, "answer")
    gold = LETTERS.index(ans.strip()) if isinstance(ans, str) and ans.strip() in LETTERS[:len(choices)] \
        else _int(ans, "answer")
    lines = [str(_field(row, "question")).strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:", list(LETTERS[:len(choices)]), _gold_in(len(choices), gold, "answer")


def mmlu_description(row: dict) -> str:
    subject = str(row.get("subject") or "").replace("_", " ").strip()
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


# ------------------------------------------------------------------------------------------- registry

CHOICE_TASKS: dict[str, ChoiceTask] = {t.name: t for t in [
    ChoiceTask("arc_easy", ("question", "choices", "answerKey"), arc, id_field="id",
               doc="ARC-Easy, 0-shot, acc/acc_norm", hub="hf:allenai/ai2_arc:ARC-Easy@test",
               fewshot_hub="hf:allenai/ai2_arc:ARC-Easy@train", default_data="arc_easy_test.jsonl"),
    ChoiceTask("arc_challenge", ("question", "choices", "answerKey"), arc, id_field="id",
               doc="ARC-Challenge, 0-shot, acc/acc_norm", hub="hf:allenai/ai2_arc:ARC-Challenge@test",
               fewshot_hub="hf:allenai/ai2_arc:ARC-Challenge@train", default_data="arc_challenge_test.jsonl"),
    ChoiceTask("boolq", ("passage", "question"), boolq, id_field="idx",
               doc="BoolQ, 0-shot, acc", hub="hf:google/boolq@validation", fewshot_hub="hf:google/boolq@train",
               default_data="boolq_validation.jsonl"),
    ChoiceTask("piqa", ("goal", "sol1", "sol2", "label"), piqa,
               doc="PIQA, 0-shot, acc/acc_norm", hub="hf:baber/piqa@validation", fewshot_hub="hf:baber/piqa@train",
               default_data="piqa_validation.jsonl"),
    ChoiceTask("siqa", ("context", "question", "answerA", "answerB", "answerC", "label"), siqa,
               doc="Social IQa, 0-shot, acc", hub="hf:allenai/social_i_qa@validation",
               fewshot_hub="hf:allenai/social_i_qa@train", default_data="siqa_validation.jsonl"),
    ChoiceTask("hellaswag", ("activity_label", "endings", "label"), hellaswag, id_field="ind",
               doc="HellaSwag, 0-shot, acc/acc_norm", hub="hf:Rowan/hellaswag@validation",
               fewshot_hub="hf:Rowan/hellaswag@train", default_data="hellaswag_validation.jsonl"),
    ChoiceTask("obqa", ("question_stem", "choices", "answerKey"), obqa, id_field="id",
               doc="OpenBookQA, 0-shot, acc/acc_norm", hub="hf:allenai/openbookqa:main@test",
               fewshot_hub="hf:allenai/openbookqa:main@train", default_data="obqa_test.jsonl"),
    ChoiceTask("winogrande", ("sentence", "option1", "option2", "answer"), winogrande,
               doc="Winogrande (partial scoring), 0-shot, acc", hub="hf:allenai/winogrande:winogrande_xl@validation",
               fewshot_hub="hf:allenai/winogrande:winogrande_xl@train", default_data="winogrande_validation.jsonl"),
    ChoiceTask("mmlu", ("question", "choices", "answer", "subject"), mmlu, fewshot=5,
               description=mmlu_description, fewshot_key="subject",
               doc="MMLU, 5-shot from the dev split (0-shot without one), acc", hub="hf:cais/mmlu:all@test",
               fewshot_hub="hf:cais/mmlu:all@dev", default_data="mmlu_test.jsonl"),
]}


# --------------------------------------------------------------------------------------------- loading


@dataclass
class ChoiceExample:
    id: str
    row: dict
    contexts: list[str]  # one per choice, without description or exemplars
    continuations: list[str]  # delimiter + choice
    gold: int
    where: str  # path:line


def iter_rows(data: str) -> Iterator[tuple[int, dict]]:
    if str(data).startswith("hf:"):
        yield from enumerate(_hub_rows(str(data)), 1)
    else:
        yield from read_rows(data)


def convert(task: ChoiceTask, row: dict, where: str) -> tuple[list[str], list[str], int]:
    """A row's contexts, continuations and gold, or a :class:`TaskDataError` naming ``where`` and the field."""
    for f in task.required:
        if f not in row or row[f] is None:
            raise TaskDataError(f"{where}: missing field {f!r} (task {task.name} needs {', '.join(task.required)})")
    try:
        return task.item(row)
    except MissingField as e:
        raise TaskDataError(f"{where}: missing field {e.args[0]} (task {task.name})") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise TaskDataError(f"{where}: {e} (task {task.name})") from None


def load_choice_examples(task: ChoiceTask, data: str, limit: int = 0) -> list[ChoiceExample]:
    """The examples of ``data`` (file or ``hf:`` id), ids from ``task.id_field`` when rows have it (made
    unique with ``#line`` on a repeat) else the row number."""
    out: list[ChoiceExample] = []
    seen: set[str] = set()
    for line, row in iter_rows(data):
        where = f"{data}:{line}"
        ctxs, conts, gold = convert(task, row, where)
        ex_id = str(row[task.id_field]) if task.id_field and row.get(task.id_field) is not None else str(line - 1)
        if ex_id in seen:
            ex_id = f"{ex_id}#{line - 1}"
        seen.add(ex_id)
        out.append(ChoiceExample(ex_id, row, ctxs, conts, gold, where))
        if limit and len(out) >= limit:
            break
    if not out:
        raise TaskDataError(f"{data}: no examples")
    return out


class Exemplars:
    """The first ``k`` rows of a few-shot file/split (per value of ``task.fewshot_key``), rendered."""

    def __init__(self, task: ChoiceTask, data: str, k: int):
        self.task, self.data, self.k = task, data, k
        self.by_key: dict[Any, list[tuple[str, str]]] = {}  # key -> [(rendered exemplar, its context)]
        if k <= 0:
            return
        for line, row in iter_rows(data):
            key = row.get(task.fewshot_key) if task.fewshot_key else None
            have = self.by_key.setdefault(key, [])
            if len(have) >= k + 1:  # one spare: an exemplar identical to the question is skipped
                continue
            ctxs, conts, gold = convert(task, row, f"{data}:{line}")
            have.append((ctxs[gold] + conts[gold], ctxs[gold]))

    def prefix(self, ex: ChoiceExample) -> str:
        """Description + exemplars (each followed by a blank line) for an example."""
        desc = self.task.description(ex.row) if self.task.description else ""
        if self.k <= 0:
            return desc
        key = ex.row.get(self.task.fewshot_key) if self.task.fewshot_key else None
        pool = [text for text, ctx in self.by_key.get(key, []) if ctx != ex.contexts[ex.gold]][:self.k]
        if len(pool) < self.k:
            what = f" with {self.task.fewshot_key}={key!r}" if self.task.fewshot_key else ""
            raise TaskDataError(f"{self.data}: {len(pool)} few-shot rows{what}, {self.k} needed "
                                f"(question {ex.where})")
        return desc + "".join(p + "\n\n" for p in pool)
