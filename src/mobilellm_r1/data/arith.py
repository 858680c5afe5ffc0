"""Multi-step arithmetic word problems: an offline reasoning task family with verifiable answers.

A problem starts a person with a number of things and changes that number one to three times, each change
told in words ("gives 7 to Ben", "ends up with three times as many", "shares them equally among 4 bags
and keeps one bag"); it asks how many are left. The reference solution writes one equation per change,
then the answer in ``\\boxed{}``::

    Maya has 23 shells. She finds 15 more shells. She gives 9 shells to Ben. Then she doubles her shells.
    How many shells does Maya have now?

    23 + 15 = 38
    38 - 9 = 29
    29 * 2 = 58
    The answer is \\boxed{58}.

Why the steps are needed: every operand is drawn at random, so the answer is a function of all of them
and of the order of the operations; no table of question → answer can be memorised, and the sentence
forms must be mapped to operations (several wordings per operation, names, pronouns and things vary).
The level of a problem is its number of steps (1, 2, 3); ``max_value`` (start value and added/removed
amounts) and ``max_result`` (every intermediate result) are the operand-size knob.

Splits are disjoint by construction: problems come from one seeded stream, a problem whose text was
already drawn is skipped, and so is one that repeats a test problem's computation (start, operations,
operands), so no test problem's text or arithmetic chain occurs in the SFT, GRPO or pre-training splits.
:func:`contamination` checks any other text (the corpus sources) for test problem texts at build time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

SPLITS = ("test", "grpo", "sft", "pretrain")

NAMES = [("Maya", "she"), ("Ben", "he"), ("Lena", "she"), ("Omar", "he"), ("Ivy", "she"), ("Tom", "he"),
         ("Rosa", "she"), ("Sam", "he"), ("Nina", "she"), ("Leo", "he"), ("Zoe", "she"), ("Max", "he"),
         ("Ada", "she"), ("Raj", "he"), ("Mia", "she"), ("Jon", "he"), ("Kate", "she"), ("Eli", "he"),
         ("Sara", "she"), ("Luis", "he")]
THINGS = ["apples", "shells", "stamps", "marbles", "books", "pens", "cards", "coins", "stickers", "cookies",
          "eggs", "beads", "rocks", "toys", "candles", "buttons", "plums", "tickets", "balloons", "bricks"]
FRIENDS = ["a friend", "his sister", "her brother", "a neighbour", "the teacher", "a cousin", "the club"]

# One change of the running count s: (op, wordings). {n} name, {p} pronoun, {P} capitalised pronoun,
# {t} things, {b} operand, {f} a friend. Operand ranges are set in _draw_op.
WORDINGS = {
    "+": ["{P} finds {b} more {t}.", "{P} buys {b} more {t}.", "{f_cap} gives {n} {b} {t}.",
          "{n} gets {b} more {t} as a gift.", "{P} picks up another {b} {t}."],
    "-": ["{P} gives {b} {t} to {f}.", "{P} loses {b} {t}.", "{P} sells {b} of the {t}.",
          "{n} gives away {b} {t}.", "{P} uses {b} {t}."],
    "*": ["Then {p} {mul_verb} {poss} {t}.", "{P} ends up with {b_word} times as many {t}.",
          "{n} now has {b_word} times as many {t} as before."],
    "/": ["{P} splits the {t} into {b} equal groups and keeps one group.",
          "{P} shares the {t} equally among {b} bags and keeps one bag."],
}
MUL_VERBS = {2: "doubles", 3: "triples"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass(frozen=True)
class ArithConfig:
    """The task family's parameters. The defaults define the ``arith`` eval task and the demo's data."""
    seed: int = 20251203
    levels: tuple[int, ...] = (1, 2, 3)  # steps per problem, drawn uniformly
    # Operand size, the difficulty knob. The default is what the tiny demo model can start to learn on two
    # cores: measured after 1500 SFT updates of 512 tokens, pass@1 0.082 at (20, 60) against 0.047 at (50, 200).
    max_value: int = 20  # start value and every added / removed amount lie in [2, max_value]
    max_result: int = 60  # every intermediate count lies in [2, max_result]
    max_factor: int = 5  # multiply / divide by 2..max_factor
    style: str = "equations"  # solution lines: "equations" (a op b = r) | "restate" (the sentence, then the equation)
    # Problems per split (test: held out; grpo: prompts; sft: worked solutions; pretrain: corpus text).
    sizes: dict[str, int] = field(default_factory=lambda: {"test": 256, "grpo": 1000, "sft": 8000,
                                                           "pretrain": 8000})

    def __hash__(self) -> int:
        return hash((self.seed, self.levels, self.max_value, self.max_result, self.max_factor, self.style,
                     tuple(sorted(self.sizes.items()))))


@dataclass(frozen=True)
class Problem:
    id: str
    level: int
    problem: str
    solution: str  # one equation per line, then the boxed answer
    answer: int
    steps: tuple[tuple[str, int, int, int], ...]  # (op, left, operand, result)

    def row(self) -> dict:
        return {"id": self.id, "level": self.level, "problem": self.problem, "solution": self.solution,
                "answer": str(self.answer)}


def _draw_op(rng: random.Random, s: int, cfg: ArithConfig) -> tuple[str, int] | None:
    ops = []
    if s + 2 <= cfg.max_result:
        ops.append("+")
    if s >= 4:
        ops.append("-")
    if s * 2 <= cfg.max_result:
        ops.append("*")
    if any(s % k == 0 and s // k >= 2 for k in range(2, cfg.max_factor + 1)):
        ops.append("/")
    if not ops:
        return None
    op = rng.choice(ops)
    if op == "+":
        return op, rng.randint(2, min(cfg.max_value, cfg.max_result - s))
    if op == "-":
        return op, rng.randint(1, min(cfg.max_value, s - 2))  # results stay >= 2: no "1" to guess
    if op == "*":
        return op, rng.choice([k for k in range(2, cfg.max_factor + 1) if s * k <= cfg.max_result])
    return op, rng.choice([k for k in range(2, cfg.max_factor + 1) if s % k == 0 and s // k >= 2])


def _apply(op: str, s: int, b: int) -> int:
    return {"+": s + b, "-": s - b, "*": s * b, "/": s // b}[op]


def _sentence(op: str, b: int, rng: random.Random, name: str, pron: str, things: str) -> str:
    forms = WORDINGS[op]
    if op == "*" and b not in MUL_VERBS:
        forms = forms[1:]  # "doubles"/"triples" only name 2 and 3
    form = rng.choice(forms)
    friend = rng.choice([f for f in FRIENDS if not (("his" in f and pron == "she") or ("her" in f and pron == "he"))])
    text = form.format(n=name, p=pron, P=pron.capitalize(), t=things, b=b, f=friend, f_cap=friend[0].upper() + friend[1:],
                       mul_verb=MUL_VERBS.get(b, ""), poss="her" if pron == "she" else "his",
                       b_word=NUMBER_WORDS.get(b, str(b)))
    return text


def draw_problem(rng: random.Random, level: int, cfg: ArithConfig) -> Problem | None:
    """One problem with ``level`` steps, or None when the draw paints itself into a corner (retry)."""
    name, pron = rng.choice(NAMES)
    things = rng.choice(THINGS)
    s = rng.randint(2, cfg.max_value)
    sentences = [f"{name} has {s} {things}."]
    steps = []
    for _ in range(level):
        drawn = _draw_op(rng, s, cfg)
        if drawn is None:
            return None
        op, b = drawn
        r = _apply(op, s, b)
        sentences.append(_sentence(op, b, rng, name, pron, things))
        steps.append((op, s, b, r))
        s = r
    sentences.append(f"How many {things} does {name} have now?")
    problem = " ".join(sentences)
    if cfg.style == "restate":  # each step quotes its sentence, then computes: "He loses 7 beads, so 9 - 7 = 2."
        lines = [sentences[0]] + [f"{sent[:-1]}, so {a} {op} {b} = {r}."
                                  for sent, (op, a, b, r) in zip(sentences[1:], steps)]
    else:
        lines = [f"{a} {op} {b} = {r}" for op, a, b, r in steps]
    solution = "\n".join(lines) + f"\nThe answer is \\boxed{{{s}}}."
    pid = hashlib.blake2s(problem.encode(), digest_size=6).hexdigest()
    return Problem(id=f"arith-{pid}", level=level, problem=problem, solution=solution, answer=s, steps=tuple(steps))


def _signature(p: Problem) -> tuple:
    return (p.steps[0][1],) + tuple((op, b) for op, _, b, _ in p.steps)


def generate_splits(cfg: ArithConfig = ArithConfig()) -> dict[str, list[Problem]]:
    """Every split of ``cfg.sizes``, filled in :data:`SPLITS` order from one seeded stream. A problem whose
    text was drawn before is skipped, and so is one whose computation (start, operations, operands) is a
    test problem's: no test problem's text, nor its arithmetic chain in other words, occurs in training.
    (Training splits may share a one-step computation among themselves: there are only ~4k of them.)"""
    unknown = sorted(set(cfg.sizes) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown arith split {unknown[0]!r} (splits: {', '.join(SPLITS)})")
    bad = [lv for lv in cfg.levels if lv < 1]
    if bad or not cfg.levels:
        raise ValueError(f"arith levels must be >= 1, got {list(cfg.levels)}")
    if cfg.max_value < 2 or cfg.max_result < cfg.max_value or cfg.max_factor < 2:
        raise ValueError("arith needs max_value >= 2, max_result >= max_value and max_factor >= 2")
    rng = random.Random(cfg.seed)
    seen_text: set[str] = set()
    test_sigs: set[tuple] = set()  # a test computation is never drawn again, in any split
    out: dict[str, list[Problem]] = {}
    for split in SPLITS:
        want = cfg.sizes.get(split, 0)
        rows: list[Problem] = []
        misses = 0
        while len(rows) < want:
            level = cfg.levels[len(rows) % len(cfg.levels)]  # balanced levels in every split
            p = draw_problem(rng, level, cfg)
            if p is None or p.problem in seen_text or _signature(p) in test_sigs:
                misses += 1
                if misses > 50 * want + 1000:
                    raise ValueError(f"arith: cannot draw {want} distinct {split} problems with {cfg} "
                                     "(raise max_value / max_result or lower the sizes)")
                continue
            seen_text.add(p.problem)
            if split == "test":
                test_sigs.add(_signature(p))
            rows.append(p)
        out[split] = rows
    return out


def guess_floor(train_answers: Iterable[str], test_answers: list[str]) -> dict:
    """pass@1 of a model that always gives the training data's most common answer: what format plus the
    answer prior earn without reading the problem, the line a model's pass@1 must clear to show reasoning."""
    counts: dict[str, int] = {}
    for a in train_answers:
        counts[str(a)] = counts.get(str(a), 0) + 1
    if not counts or not test_answers:
        return {"answer": None, "pass@1": 0.0}
    best = max(counts, key=lambda k: (counts[k], k))
    return {"answer": best, "pass@1": sum(str(a) == best for a in test_answers) / len(test_answers)}


def heldout_rows(cfg: ArithConfig = ArithConfig()) -> list[dict]:
    """The held-out test split as task rows (what ``mobilellm-r1 eval --task arith`` reads by default). The
    test split is drawn first, so drawing it alone gives the same problems without the 16k training ones."""
    return [p.row() for p in generate_splits(dataclasses.replace(cfg, sizes={"test": cfg.sizes["test"]}))["test"]]


_QUESTION = re.compile(r"How many [a-z]+ does [A-Z][a-z]+ have now\?")


def contamination(problems: Iterable[str], files: Iterable[str | Path]) -> dict:
    """How many of ``problems`` occur verbatim in ``files`` (read as text: the problems hold no character
    that JSON escapes, so a JSONL line holds them as they are). Every problem ends with its question
    sentence, so one regex pass per file finds the candidate ends and only those are compared: linear in
    the corpus, not in corpus x problems."""
    by_question: dict[str, list[str]] = {}
    for p in dict.fromkeys(problems):
        m = _QUESTION.search(p)
        if m is None or m.end() != len(p):
            raise ValueError(f"not an arith problem (no closing question): {p[:80]!r}")
        by_question.setdefault(m.group(0), []).append(p)
    found: dict[str, str] = {}
    nbytes = nfiles = 0
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        nbytes += len(text)
        nfiles += 1
        for m in _QUESTION.finditer(text):
            for p in by_question.get(m.group(0), ()):
                if p not in found and text.startswith(p, m.end() - len(p)):
                    found[p] = Path(f).name
    return {"checked": sum(map(len, by_question.values())), "found": len(found), "files": nfiles,
            "chars_scanned": nbytes, "where": dict(list(found.items())[:5])}


def fact_table(cfg: ArithConfig = ArithConfig()) -> list[tuple[str, int, int, int]]:
    """Every one-step computation a problem of ``cfg`` can contain, as ``(op, left, operand, result)``:
    the same ranges as :func:`_draw_op`, so the table is exactly the arithmetic the task asks for."""
    facts = []
    for a in range(2, cfg.max_result + 1):
        facts += [("+", a, b, a + b) for b in range(2, min(cfg.max_value, cfg.max_result - a) + 1)]
        facts += [("-", a, b, a - b) for b in range(1, min(cfg.max_value, a - 2) + 1)] if a >= 4 else []
        facts += [("*", a, k, a * k) for k in range(2, cfg.max_factor + 1) if a * k <= cfg.max_result]
        facts += [("/", a, k, a // k) for k in range(2, cfg.max_factor + 1) if a % k == 0 and a // k >= 2]
    return facts


def iter_drill_docs(cfg: ArithConfig = ArithConfig(), docs: int = 2000, per_doc: int = 16) -> Iterator[dict]:
    """Pre-training (and SFT) text: single equations of the task's own fact table (:func:`fact_table`),
    ``per_doc`` a document: an operation uniformly (as problems draw them), then one of its facts (seeded).
    Why: a worked problem supervises one to three results in ~100 tokens, so a small model copies the
    operands into its equations long before it can add them (measured: after 3000 SFT updates, 139 of 256
    first steps had the right operands and a wrong result). A line here is ~10 tokens, all arithmetic; 16
    lines (~160 tokens) fit one 256-token SFT row. Facts carry no problem text, names or chains: no test
    problem leaks."""
    by_op: dict[str, list[tuple[str, int, int, int]]] = {}
    for f in fact_table(cfg):
        by_op.setdefault(f[0], []).append(f)
    ops = sorted(by_op)
    rng = random.Random(cfg.seed + 1)
    for i in range(docs):
        lines = (f"{a} {op} {b} = {r}" for op, a, b, r in (rng.choice(by_op[rng.choice(ops)]) for _ in range(per_doc)))
        yield {"id": f"arith/drill/{i}", "text": "\n".join(lines)}


def iter_pretrain_docs(problems: list[Problem], per_doc: int = 8) -> Iterator[dict]:
    """Pre-training text: worked problems, several per document, in the plain question/answer form."""
    for i in range(0, len(problems), per_doc):
        group = problems[i:i + per_doc]
        text = "\n\n".join(f"Question: {p.problem}\nAnswer:\n{p.solution}" for p in group)
        yield {"id": f"arith/pretrain/{i // per_doc}", "text": text}
