"""Math answer grading: extraction, normalisation and equivalence.

Used to score GSM8K, MATH500, AIME and AMC, and as the GRPO correctness reward.

Public API
----------
- :func:`extract_answer` pulls the final answer out of a completion (last ``\\boxed{}``, else
  "the (final) answer is X", else GSM8K's ``#### X``, else the last number).
- :func:`normalize` maps an answer string to a canonical string form.
- :func:`is_equiv` decides whether two answers are the same.
- :func:`grade` = extraction + equivalence, returning ``{"correct", "pred", "gold"}``.

Equivalence, in order
---------------------
1. equal canonical strings (:func:`normalize`);
2. structured answers compared element by element: matrices (shape and entries), tuples and
   intervals (the bracket characters must agree, so ``(1,2]`` differs from ``(1,2)``), sets
   ``\\{..\\}`` and bare comma lists (unordered), unions of intervals (unordered), ``a \\pm b``
   (the set ``{a+b, a-b}``), equations (``y = 2x+1`` matches ``2x+1`` when the gold has no ``=``;
   two equations match when ``lhs - rhs`` of one is a non-zero constant multiple of the other's);
3. numbers: integers must be exactly equal; as soon as one side is not an integer (decimals,
   ``a/b``, ``\\frac{a}{b}``, mixed numbers ``1\\frac{4}{5}``) they are compared with
   relative tolerance 1e-6 and absolute tolerance 1e-9;
4. symbolic: both sides are converted from LaTeX to a SymPy expression by the small converter in
   this module (``\\frac``, ``\\sqrt[n]{}``, ``^``, ``\\pi``, ``\\cdot``, ``\\times``, implicit
   multiplication, trig/log functions, ``|x|``, ``n!``, ``\\binom``...) and compared with
   ``simplify(a - b) == 0`` (constant expressions numerically, with the tolerance above).

Choices worth knowing
---------------------
- Percentages: a number written with ``%`` (or ``\\%``, or the word "percent") matches both its face
  value and a hundredth of it: ``50\\%`` equals ``50`` and ``0.5``.
- Units and degree signs are dropped (a conservative list of unit words, e.g. "dollars", "cm",
  "degrees"): ``90^\\circ`` equals ``90`` and ``5.4 \\text{ cents}`` equals ``5.4``.
- A leading single-variable assignment (``x = 5``, ``y = 2x+3``, ``x \\in [-2, 7]``) is dropped.
- ``i`` is the imaginary unit. Answers containing words (runs of three or more letters outside
  LaTeX commands, e.g. ``\\text{Evelyn}``) are only compared as strings, so anagrams never match.
- Bases such as ``52_8`` are strings (``52_8`` is not ``52``).
- ``sympy.parsing.latex.parse_latex`` is not used: it needs ``antlr4-python3-runtime`` (4.11 for
  SymPy 1.14), which is not a dependency, and a grader whose verdicts depend on an optional package
  would give different rewards on different machines.

Timeouts
--------
SymPy runs in a separate worker process (``python -P``, loading only this file), kept alive between
comparisons. Every call waits at most ``timeout`` seconds for it; past that the worker is killed, a
fresh one is started in the background, and the comparison counts as not equivalent. This works
from any thread (no signals), and the caller's process never evaluates a power or a SymPy
expression itself. The worker's address space is capped (4 GiB) so a runaway expansion dies
instead of swapping.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import random
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from fractions import Fraction

__all__ = ["extract_answer", "normalize", "is_equiv", "grade"]


# --------------------------------------------------------------------------------------------
# Brace helpers
# --------------------------------------------------------------------------------------------

def _match_brace(s: str, i: int) -> int:
    """Index of the ``}`` matching the ``{`` at ``s[i]``, or -1. Escaped ``\\{``/``\\}`` are skipped."""
    depth = 0
    j = i
    n = len(s)
    while j < n:
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


_OPEN = "([{"
_CLOSE = ")]}"


def _split_top(s: str, sep: str) -> list[str]:
    """Split ``s`` on ``sep`` at bracket depth 0 (``()[]{}``, ``\\{\\}`` all count as brackets)."""
    parts, depth, start, i, n, L = [], 0, 0, 0, len(s), len(sep)
    while i < n:
        c = s[i]
        if c == "\\":
            if i + 1 < n and s[i + 1] in "{}":
                depth += 1 if s[i + 1] == "{" else -1
                i += 2
                continue
            if depth == 0 and s.startswith(sep, i):
                parts.append(s[start:i])
                i += L
                start = i
                continue
            i += 2 if (i + 1 < n and not s[i + 1].isalpha()) else 1
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += L
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _outer_group(s: str) -> tuple[str, str, str] | None:
    """``(open, inner, close)`` when ``s`` is one bracketed group ``(..)``, ``[..]``, ``(..]``, ``[..)``."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    depth = 0
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0 and i != n - 1:
                return None
        i += 1
    if depth != 0:
        return None
    return s[0], s[1:-1], s[-1]


def _is_set_literal(s: str) -> bool:
    if not (s.startswith("\\{") and s.endswith("\\}")) or len(s) < 4:
        return False
    depth = 0
    i = 0
    n = len(s)
    while i < n:
        if s.startswith("\\{", i):
            depth += 1
            i += 2
            continue
        if s.startswith("\\}", i):
            depth -= 1
            if depth == 0 and i != n - 2:
                return False
            i += 2
            continue
        i += 1
    return depth == 0


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is\b|:)", re.I)
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?(?![\d])"
    r"|(?<![\w.])-?\.\d+"
)


def _last_boxed(text: str) -> str | None:
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            k = _match_brace(text, j)
            if k == -1:
                continue  # unbalanced (truncated) box: fall back to an earlier one
            content = text[j + 1:k].strip()
        else:
            mm = re.match(r"[^\s$]+", text[j:])
            content = mm.group(0).strip() if mm else ""
        if content:
            return content
    return None


def has_boxed_answer(text: str | None) -> bool:
    """Whether ``text`` states its answer in a non-empty, closed ``\\boxed{..}`` (or ``\\fbox``): the answer
    format the math system prompt asks for, so its share of completions is the format-following rate."""
    return isinstance(text, str) and _last_boxed(text) is not None


def _strip_math_delims(x: str) -> str:
    x = x.strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if x.startswith(a) and x.endswith(b) and len(x) >= len(a) + len(b):
            return x[len(a):len(x) - len(b)].strip()
    return x


def _after_answer_is(rest: str) -> str | None:
    rest = rest.lstrip(" \t:*")
    if not rest:
        return None
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(a):
            k = rest.find(b, len(a))
            if k != -1:
                x = rest[len(a):k].strip()
                return x or None
    line = rest.split("\n", 1)[0]
    m = re.match(r"(-?[\d,]*\.?\d+(?:/\d+)?)\s+(?!(?:or|and)\b)[a-zA-Z]", line)  # "42 apples" -> "42"
    if m:
        return m.group(1)
    m = re.search(r"\.(?!\d)\s", line)  # sentence end (not a decimal point)
    if m:
        line = line[:m.start()]
    x = line.strip().rstrip(".").strip().strip("*").strip()
    x = _strip_math_delims(x).rstrip(".").strip()
    return x or None


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``, or None.

    Preference: the last ``\\boxed{..}`` / ``\\fbox{..}`` / ``\\boxed X`` (balanced braces); else the last
    "the (final) answer is X" (case-insensitive; ``$..$`` and a trailing period stripped); else the
    last GSM8K ``#### X``; else the last number (integer, decimal, ``1,000``, negative, ``3/4``).
    """
    if not text or not isinstance(text, str):
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for m in reversed(list(_ANSWER_IS_RE.finditer(text))):
        x = _after_answer_is(text[m.end():])
        if x:
            return x
    hashes = _HASH_RE.findall(text)
    for h in reversed(hashes):
        h = h.strip().rstrip(".").strip()
        if h:
            return _strip_math_delims(h)
    nums = _NUMBER_RE.findall(text)
    if nums:
        return nums[-1]
    return None


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u00b7": "\\cdot ", "\u22c5": "\\cdot ",
    "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u221a": "\\sqrt", "\u2264": "\\leq ", "\u2265": "\\geq ",
    "\u2260": "\\neq ", "\u00b0": "^\\circ", "\u222a": "\\cup ", "\u00b1": "\\pm ", "\u00f7": "\\div ",
    "\u2009": " ", "\u00a0": " ",
}
_TEXT_CMDS = ("text", "textbf", "textit", "textrm", "textnormal", "mathrm", "mathbf", "mathit",
              "mathsf", "mbox", "hbox", "operatorname", "boxed", "fbox", "emph")
_TEXT_CMD_RE = re.compile(r"\\(" + "|".join(_TEXT_CMDS) + r")\s*\{")
_UNIT_WORDS = (
    "dollars", "dollar", "cents", "cent", "units", "unit", "centimeters", "centimetres",
    "centimeter", "cm", "millimeters", "mm", "meters", "metres", "meter", "km", "kilometers",
    "inches", "inch", "feet", "foot", "ft", "yards", "yard", "miles", "mile", "mph", "hours", "hour",
    "hrs", "minutes", "minute", "mins", "seconds", "second", "secs", "days", "day", "weeks", "week",
    "months", "month", "years", "year", "degrees", "degree", "radians", "grams", "gram", "kg",
    "kilograms", "pounds", "pound", "lbs", "ounces", "ounce", "oz", "liters", "litres", "liter",
    "gallons", "gallon", "percent", "sq units", "square units",
)
_UNIT_RE = re.compile(
    r"^(.*?[0-9}).])\s*(?:(?:square|sq\.?|cubic)\s+)?(?:" + "|".join(_UNIT_WORDS) +
    r")(?:\s*\^\s*\{?[23]\}?)?\s*\.?$", re.I | re.S)
_SIZE_CMD_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])")
_SPACE_CMD_RE = re.compile(r"(?<!\\)\\(?:[,;:! ]|quad|qquad|displaystyle|textstyle|scriptstyle)(?![a-zA-Z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|\^\s*\{\s*\}")
_ASSIGN_RE = re.compile(
    r"^(?:[a-zA-Z]|\\(?:alpha|beta|gamma|delta|theta|lambda|mu|phi|psi|omega|rho|sigma|tau))"
    r"(?:_\{?[a-zA-Z0-9]+\}?)?(?:=|\\in(?![a-zA-Z]))")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_PLAIN_NUM_RE = re.compile(r"^([-+]?)(\d*)(?:\.(\d*))?$")


def _unwrap_text_cmds(s: str) -> str:
    for _ in range(50):
        m = _TEXT_CMD_RE.search(s)
        if not m:
            break
        j = m.end() - 1
        k = _match_brace(s, j)
        if k == -1:
            s = s[:m.start()] + s[j + 1:]
        else:
            s = s[:m.start()] + s[j + 1:k] + s[k + 1:]
    return s


def _read_arg(s: str, i: int) -> tuple[str, int] | None:
    """One LaTeX argument at ``s[i]``: a braced group or a single character (one space skipped)."""
    if i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        k = _match_brace(s, i)
        if k == -1:
            return None
        return s[i + 1:k], k + 1
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m and m.group(0)[1:] not in ("frac", "sqrt", "binom", "left", "right", "begin", "end"):
            return m.group(0), i + m.end()  # \frac\pi2 -> \frac{\pi}{2}
        return None
    if s[i] in "}^_)]&":
        return None
    return s[i], i + 1


def _brace_args(s: str, cmd: str, nargs: int) -> str:
    """Rewrite ``\\cmd`` arguments into braced form: ``\\frac12`` -> ``\\frac{1}{2}``."""
    out = []
    pat = re.compile(r"\\" + cmd + r"(?![a-zA-Z])")
    pos = 0
    while True:
        m = pat.search(s, pos)
        if not m:
            out.append(s[pos:])
            break
        out.append(s[pos:m.end()])
        i = m.end()
        if cmd == "sqrt" and i < len(s) and s[i] == "[":
            k = s.find("]", i)
            if k != -1:
                out.append(s[i:k + 1])
                i = k + 1
        args = []
        j = i
        for _ in range(nargs):
            r = _read_arg(s, j)
            if r is None:
                break
            args.append(r[0])
            j = r[1]
        if len(args) == nargs:
            out.append("".join("{" + a + "}" for a in args))
            pos = j
        else:
            pos = i
    return "".join(out)


def _canon_number(s: str) -> str:
    m = _PLAIN_NUM_RE.match(s)
    if not m or not (m.group(2) or m.group(3)):
        return s
    sign, ip, fp = m.group(1), m.group(2).lstrip("0") or "0", (m.group(3) or "").rstrip("0")
    out = ip + ("." + fp if fp else "")
    if out == "0":
        return "0"
    return ("-" if sign == "-" else "") + out


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and _match_brace(s, 0) == len(s) - 1:
        s = s[1:-1]
    return s


def normalize(ans: str) -> str:
    """Canonical string form of an answer (see the module docstring for what is dropped)."""
    if ans is None:
        return ""
    s = str(ans).strip()
    if not s:
        return ""
    for k, v in _UNICODE.items():
        if k in s:
            s = s.replace(k, v)
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "")
    s = re.sub(r"(?<!\\)\\[\[\]()]", "", s)  # \( \) \[ \] delimiters
    s = _SPACE_CMD_RE.sub(" ", s)
    s = s.replace("~", " ")
    s = _SIZE_CMD_RE.sub("", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\dbinom(?![a-zA-Z])", r"\\binom", s)
    s = re.sub(r"\\[bB]matrix", "pmatrix", s).replace("{bmatrix}", "{pmatrix}")
    s = _unwrap_text_cmds(s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "%").replace("%", "")
    s = re.sub(r"(?<=\d)\s*\^\s*\{?\s*(?:th|st|nd|rd)\s*\}?", "", s)  # 5^{th} -> 5
    s = re.sub(r"\\(?:le|leqslant)(?![a-zA-Z])", r"\\leq", s)
    s = re.sub(r"\\(?:ge|geqslant)(?![a-zA-Z])", r"\\geq", s)
    s = re.sub(r"\\ne(?![a-zA-Z])", r"\\neq", s)
    s = re.sub(r"\\(?:infinity|inf)(?![a-zA-Z])", r"\\infty", s)
    s = s.strip()
    for _ in range(3):  # "5.4 cents", "864 inches^2", "3 square units"
        m = _UNIT_RE.match(s)
        if not m or not re.search(r"\d", m.group(1)):
            break
        s = m.group(1).strip()
    s = re.sub(r"\s+(?:or|and)\s+", ",", s)
    # whitespace: drop it, except one space between a control word and a following letter
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(\\[a-zA-Z]+) (?=[a-zA-Z])", "\\1\x00", s)
    s = s.replace(" ", "").replace("\x00", " ")
    s = _brace_args(s, "frac", 2)
    s = _brace_args(s, "binom", 2)
    s = _brace_args(s, "sqrt", 1)
    s = re.sub(r"([\^_])\{([a-zA-Z0-9])\}", r"\1\2", s)
    s = _strip_outer_braces(s)
    s = s.rstrip(".").strip()
    if s.count("=") == 1 or re.match(r"^[a-zA-Z]\\in", s):
        m = _ASSIGN_RE.match(s)
        if m and len(s) > m.end():
            s = s[m.end():]
    s = _strip_outer_braces(s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = _canon_number(s)
    m = re.match(r"^\(([A-E])\)$", s)
    if m:
        s = m.group(1)
    return s


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_RE_DEC = re.compile(rf"^([-+]?){_NUM}$")
_RE_SLASH = re.compile(rf"^([-+]?)({_NUM})/({_NUM})$")
_RE_FRAC = re.compile(rf"^([-+]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}$")
_RE_MIXED = re.compile(r"^([-+]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$")


def _to_number(s: str) -> Fraction | None:
    """A plain number (int, decimal, a/b, \\frac{a}{b}, mixed number) as an exact Fraction."""
    if not s or len(s) > 400:
        return None
    try:
        if _RE_DEC.match(s):
            return Fraction(s)
        m = _RE_SLASH.match(s) or _RE_FRAC.match(s)
        if m:
            den = Fraction(m.group(3))
            if den == 0:
                return None
            v = Fraction(m.group(2)) / den
            return -v if m.group(1) == "-" else v
        m = _RE_MIXED.match(s)
        if m and int(m.group(4)) != 0:
            v = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
            return -v if m.group(1) == "-" else v
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _num_close(x: Fraction, y: Fraction) -> bool:
    if x == y:
        return True
    if x.denominator == 1 and y.denominator == 1:
        return False  # integers must match exactly
    try:
        return math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9)
    except OverflowError:
        return abs(x - y) <= Fraction(1, 10**6) * max(abs(x), abs(y))


# --------------------------------------------------------------------------------------------
# LaTeX -> SymPy source string (parsed and evaluated only in the worker process)
# --------------------------------------------------------------------------------------------

class _ConvertError(Exception):
    pass


_FUNCS = {
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc",
    "arcsin": "asin", "arccos": "acos", "arctan": "atan", "sinh": "sinh", "cosh": "cosh",
    "tanh": "tanh", "ln": "log", "log": "log", "exp": "exp",
}
_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
    "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
    "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega",
}
_CONSTS = {"pi": "pi", "infty": "oo"}
_OTHER_CMDS = {"frac", "sqrt", "binom", "cdot", "times", "div", "lfloor", "rfloor", "lceil", "rceil"}
_KNOWN_CMDS = set(_FUNCS) | _GREEK | set(_CONSTS) | _OTHER_CMDS
_ATOM_CMDS = set(_FUNCS) | _GREEK | set(_CONSTS) | {"frac", "sqrt", "binom", "lfloor", "lceil"}
_TOKEN_RE = re.compile(r"\s+|\d+(?:\.\d+)?|\.\d+|\\[a-zA-Z]+|\\.|\*\*|.", re.S)
_SAFE_OUT_RE = re.compile(r"[A-Za-z0-9_+\-*/(), ]*")


def _tokenize(s: str) -> list[tuple[str, str]]:
    toks: list[tuple[str, str]] = []
    for m in _TOKEN_RE.finditer(s):
        t = m.group(0)
        if t.isspace():
            continue
        if t[0].isdigit() or (t[0] == "." and len(t) > 1):
            toks.append(("num", t))
        elif t.startswith("\\") and len(t) > 1 and t[1].isalpha():
            name = t[1:]
            if name not in _KNOWN_CMDS:  # \pix -> \pi x
                pref = max((c for c in _KNOWN_CMDS if name.startswith(c)), key=len, default=None)
                if pref is None:
                    raise _ConvertError(t)
                toks.append(("cmd", pref))
                toks.extend(("letter", ch) for ch in name[len(pref):])
                continue
            toks.append(("cmd", name))
        elif t == "**":
            toks.append(("op", "^"))
        elif t.isalpha() and len(t) == 1 and t.isascii():
            toks.append(("letter", t))
        else:
            toks.append(("op", t))
    return toks


class _Converter:
    def __init__(self, s: str):
        self.toks = _tokenize(s)
        self.i = 0
        self.abs_depth = 0

    def peek(self, k: int = 0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("eof", "")

    def next(self):
        t = self.peek()
        if t[0] == "eof":
            raise _ConvertError("unexpected end")
        self.i += 1
        return t

    def expect(self, kind: str, val: str):
        t = self.next()
        if t != (kind, val):
            raise _ConvertError(f"expected {val}, got {t}")

    def convert(self) -> str:
        out = self.expr()
        if self.peek()[0] != "eof":
            raise _ConvertError(f"trailing {self.peek()}")
        return out

    def expr(self) -> str:
        out = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.next()[1]
            out = f"({out}){op}({self.term()})"
        return out

    def starts_atom(self, t) -> bool:
        kind, v = t
        if kind in ("num", "letter"):
            return True
        if kind == "cmd":
            return v in _ATOM_CMDS
        if kind == "op":
            return v in ("(", "[", "{") or (v == "|" and self.abs_depth == 0)
        return False

    def term(self) -> str:
        out = self.unary()
        while True:
            t = self.peek()
            if t in (("op", "*"), ("cmd", "cdot"), ("cmd", "times")):
                self.next()
                out = f"({out})*({self.unary()})"
            elif t in (("op", "/"), ("cmd", "div")):
                self.next()
                out = f"({out})/({self.unary()})"
            elif self.starts_atom(t):
                out = f"({out})*({self.power()})"
            else:
                return out

    def unary(self) -> str:
        t = self.peek()
        if t == ("op", "-"):
            self.next()
            return f"-({self.unary()})"
        if t == ("op", "+"):
            self.next()
            return self.unary()
        return self.power()

    def power(self) -> str:
        base = self.postfix()
        if self.peek() == ("op", "^"):
            self.next()
            base = f"({base})**({self.exponent()})"
            if self.peek() == ("op", "^"):
                raise _ConvertError("ambiguous double exponent")
        return base

    def exponent(self) -> str:
        t = self.peek()
        if t == ("op", "-"):
            self.next()
            return f"-({self.exponent()})"
        if t == ("op", "{"):
            return self.group()
        if t == ("op", "("):
            self.next()
            inner = self.expr()
            self.expect("op", ")")
            return f"({inner})"
        if t[0] == "num":  # the whole number (x^10), never a mixed number (x^2\frac12)
            self.next()
            return self._num(t[1])
        if t[0] in ("letter", "cmd"):
            return self.atom()
        raise _ConvertError(f"bad exponent {t}")

    def postfix(self) -> str:
        out = self.atom()
        while self.peek() == ("op", "!"):
            self.next()
            out = f"factorial({out})"
        return out

    def group(self) -> str:
        """A braced group ``{expr}`` or, LaTeX style, a single token."""
        t = self.peek()
        if t == ("op", "{"):
            self.next()
            inner = self.expr()
            self.expect("op", "}")
            return f"({inner})"
        if t[0] == "num":  # LaTeX takes one character: \log_28 is log base 2 of 8
            self.next()
            if len(t[1]) > 1 and t[1][0].isdigit():
                self.toks.insert(self.i, ("num", t[1][1:]))
                return self._num(t[1][0])
            return self._num(t[1])
        return self.atom()

    @staticmethod
    def _num(v: str) -> str:
        if len(v) > 1000:
            raise _ConvertError("number too long")
        if "." in v:
            ip, fp = v.split(".")
            return f"({int((ip or '0') + fp)}/{10 ** len(fp)})"
        return str(int(v))

    def _int_frac_follows(self) -> bool:
        """``\\frac{int}{int}`` next (mixed numbers such as ``1\\frac{4}{5}``)."""
        pat = [("cmd", "frac"), ("op", "{"), "int", ("op", "}"), ("op", "{"), "int", ("op", "}")]
        for k, p in enumerate(pat):
            t = self.peek(k)
            if p == "int":
                if t[0] != "num" or not t[1].isdigit():
                    return False
            elif t != p:
                return False
        return True

    def _func_arg(self) -> str:
        t = self.peek()
        if t == ("op", "("):
            self.next()
            inner = self.expr()
            self.expect("op", ")")
            return inner
        if t == ("op", "{"):
            return self.group()
        out = self.power()
        while self.starts_atom(self.peek()) and not (self.peek()[0] == "cmd" and self.peek()[1] in _FUNCS):
            out = f"({out})*({self.power()})"
        return out

    def atom(self) -> str:
        kind, v = self.next()
        if kind == "num":
            out = self._num(v)
            if v.isdigit() and self._int_frac_follows():
                self.next()
                a = self.group()
                b = self.group()
                return f"({out}+({a})/({b}))"
            return out
        if kind == "letter":
            name = v
            if self.peek() == ("op", "_"):
                self.next()
                t = self.next()
                if t[0] in ("num", "letter"):
                    sub = t[1]
                elif t == ("op", "{"):
                    parts = []
                    while self.peek() != ("op", "}"):
                        p = self.next()
                        if p[0] not in ("num", "letter"):
                            raise _ConvertError("complex subscript")
                        parts.append(p[1])
                    self.next()
                    sub = "".join(parts)
                else:
                    raise _ConvertError("bad subscript")
                if not re.fullmatch(r"[A-Za-z0-9]+", sub):
                    raise _ConvertError("bad subscript")
                name = f"{name}_{sub}"
            if name == "i":
                return "I"
            return f"sym_{name}"
        if kind == "op":
            if v in ("(", "["):
                close = ")" if v == "(" else "]"
                inner = self.expr()
                self.expect("op", close)
                return f"({inner})"
            if v == "{":
                inner = self.expr()
                self.expect("op", "}")
                return f"({inner})"
            if v == "|" and self.abs_depth == 0:
                self.abs_depth += 1
                inner = self.expr()
                self.expect("op", "|")
                self.abs_depth -= 1
                return f"Abs({inner})"
            raise _ConvertError(f"unexpected {v}")
        if kind == "cmd":
            if v in _CONSTS:
                return _CONSTS[v]
            if v in _GREEK:
                return f"sym_{v}"
            if v == "frac":
                a = self.group()
                b = self.group()
                return f"(({a})/({b}))"
            if v == "binom":
                a = self.group()
                b = self.group()
                return f"binomial({a},{b})"
            if v == "sqrt":
                if self.peek() == ("op", "["):
                    self.next()
                    n = self.expr()
                    self.expect("op", "]")
                    return f"root({self.group()},{n})"
                return f"sqrt({self.group()})"
            if v in ("lfloor", "lceil"):
                inner = self.expr()
                self.expect("cmd", "rfloor" if v == "lfloor" else "rceil")
                return f"{'floor' if v == 'lfloor' else 'ceiling'}({inner})"
            if v in _FUNCS:
                fn = _FUNCS[v]
                base = None
                if fn == "log" and v == "log" and self.peek() == ("op", "_"):
                    self.next()
                    base = self.group()
                exp = None
                if self.peek() == ("op", "^"):
                    self.next()
                    exp = self.exponent()
                arg = self._func_arg()
                out = f"log({arg},{base})" if base is not None else f"{fn}({arg})"
                return f"({out})**({exp})" if exp is not None else out
        raise _ConvertError(f"unexpected {kind} {v}")


def _to_sympy_src(s: str) -> str | None:
    """LaTeX (already normalised) -> a SymPy source string made only of numbers, ``sym_*`` names,
    a fixed set of function names and ``+-*/(),``; None when the form is not supported."""
    if not s or len(s) > 2000:
        return None
    try:
        out = _Converter(s).convert()
    except (_ConvertError, RecursionError, ValueError):
        return None
    if not _SAFE_OUT_RE.fullmatch(out) or "__" in out:
        return None
    return out


# --------------------------------------------------------------------------------------------
# SymPy worker process
# --------------------------------------------------------------------------------------------

_WORKER_MEM_BYTES = 4 << 30
_WORKER_STARTUP_S = 120.0
_SYMPY_FUNCS = ("sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh",
                "tanh", "log", "exp", "sqrt", "root", "Abs", "factorial", "binomial", "floor",
                "ceiling", "pi", "oo", "I")


def _sympy_compare(kind: str, a: str, b: str) -> bool:
    """Runs in the worker. ``expr``: a == b; ``prop``: a is a non-zero constant multiple of b."""
    import sympy
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations

    def parse(src: str):
        if not _SAFE_OUT_RE.fullmatch(src) or "__" in src:
            raise ValueError("unsafe")
        local = {name: getattr(sympy, name) for name in _SYMPY_FUNCS}
        for name in set(re.findall(r"sym_[A-Za-z0-9_]+", src)):
            local[name] = sympy.Symbol(name)
        glob = {"Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational,
                "Symbol": sympy.Symbol, "Function": sympy.Function, "__builtins__": {}}
        return parse_expr(src, local_dict=local, global_dict=glob,
                          transformations=standard_transformations, evaluate=True)

    ea, eb = parse(a), parse(b)
    if kind == "prop":
        if ea == 0 or eb == 0:
            return sympy.simplify(ea - eb) == 0
        r = sympy.simplify(ea / eb)
        return bool(not r.free_symbols and r.is_number and r != 0 and r.is_finite)
    if ea == eb:
        return True
    if ea.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) or eb.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
        return False
    if not ea.free_symbols and not eb.free_symbols:
        if ea.is_Rational and eb.is_Rational:
            if ea.is_Integer and eb.is_Integer:
                return False
            x, y = Fraction(int(ea.p), int(ea.q)), Fraction(int(eb.p), int(eb.q))
            return _num_close(x, y)
        va, vb = complex(sympy.N(ea, 30)), complex(sympy.N(eb, 30))
        if not all(map(math.isfinite, (va.real, va.imag, vb.real, vb.imag))):
            return False
        return abs(va - vb) <= max(1e-9, 1e-6 * max(abs(va), abs(vb)))
    d = ea - eb
    if sympy.expand(d) == 0:
        return True
    # Evaluate both sides at a few random rational points: a clear difference at any point proves
    # inequality (much faster than simplify); agreement at several points is accepted as equality.
    rng = random.Random(1234)
    syms = sorted(d.free_symbols, key=str)
    agree = 0
    for _ in range(6):
        point = {x: sympy.Rational(rng.choice((-1, 1)) * rng.randint(1, 97), rng.randint(1, 13)) for x in syms}
        try:
            va = complex(ea.xreplace(point).evalf(30))
            vb = complex(eb.xreplace(point).evalf(30))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue
        if not all(map(math.isfinite, (va.real, va.imag, vb.real, vb.imag))):
            continue
        if abs(va - vb) > 1e-9 * max(1.0, abs(va), abs(vb)):
            return False
        agree += 1
    if agree >= 4:
        return True
    return sympy.simplify(d) == 0


def _worker_loop() -> None:  # pragma: no cover - runs in the child process
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEM_BYTES, _WORKER_MEM_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    import sympy  # noqa: F401  (warm the import before saying ready)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            continue
        try:
            res = bool(_sympy_compare(req["kind"], req["a"], req["b"]))
        except MemoryError:
            res = None
        except Exception:  # any parse/simplify failure means "not shown equal"
            res = False
        out.write(json.dumps({"id": req["id"], "r": res}) + "\n")
        out.flush()


_WORKER_CODE = (
    "import importlib.util as u, sys\n"
    "s = u.spec_from_file_location('_mobilellm_r1_math_grader_worker', sys.argv[1])\n"
    "m = u.module_from_spec(s); s.loader.exec_module(m); m._worker_loop()\n"
)


class _SympyWorker:
    """One long-lived SymPy worker process; killed and replaced when a comparison times out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.ready = False
        self.next_id = 0
        self.pid = os.getpid()
        self.cache: OrderedDict[tuple[str, str, str], bool] = OrderedDict()
        self.timeouts = 0
        self.broken_until = 0.0  # after a failed start (e.g. no SymPy) do not retry for a while

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", _WORKER_CODE, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            bufsize=0, close_fds=True)
        self.buf = b""
        self.ready = False

    def _kill(self) -> None:
        p, self.proc = self.proc, None
        self.ready = False
        self.buf = b""
        if p is None:
            return
        try:
            p.kill()
        except OSError:
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except (OSError, AttributeError):
                pass

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            r, _, _ = select.select([fd], [], [], remaining)
            if not r:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("worker exited")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def shutdown(self) -> None:
        if self.pid == os.getpid():
            self._kill()

    def warm(self) -> None:
        with self.lock:
            self._ensure_ready()

    def _ensure_ready(self) -> bool:
        if self.pid != os.getpid():  # forked child: the process belongs to the parent
            self.proc, self.ready, self.buf, self.pid = None, False, b"", os.getpid()
        if self.proc is None or self.proc.poll() is not None:
            self._kill()
            self._spawn()
        if not self.ready:
            try:
                line = self._readline(time.monotonic() + _WORKER_STARTUP_S)
            except (EOFError, OSError):
                line = None
            if line != b"ready":
                self._kill()
                self.broken_until = time.monotonic() + 60.0
                return False
            self.ready = True
        return True

    def compare(self, kind: str, a: str, b: str, timeout: float) -> bool | None:
        """True/False from SymPy; None when it timed out or failed."""
        key = (kind, a, b)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
            if timeout <= 0 or time.monotonic() < self.broken_until or not self._ensure_ready():
                return None
            self.next_id += 1
            rid = self.next_id
            try:
                self.proc.stdin.write((json.dumps({"id": rid, "kind": kind, "a": a, "b": b}) + "\n").encode())
                deadline = time.monotonic() + timeout
                while True:
                    line = self._readline(deadline)
                    if line is None:
                        break
                    resp = json.loads(line)
                    if resp.get("id") == rid:
                        res = resp.get("r")
                        if res is None:  # out of memory in the worker: start afresh
                            self._kill()
                            return None
                        self.cache[key] = bool(res)
                        if len(self.cache) > 4096:
                            self.cache.popitem(last=False)
                        return bool(res)
            except (EOFError, OSError, ValueError):
                self._kill()
                return None
            # timed out: kill it and start a replacement now, so it warms up in the background
            self.timeouts += 1
            self._kill()
            try:
                self._spawn()
            except OSError:
                self.proc = None
            return None


_WORKER = _SympyWorker()
atexit.register(_WORKER.shutdown)


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[a-zA-Z]{3,}")
_MATRIX_RE = re.compile(r"^\\begin\{(pmatrix|matrix|smallmatrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}$", re.S)


class _Ctx:
    __slots__ = ("deadline", "timeout")

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout

    def remaining(self) -> float:
        return min(self.timeout, self.deadline - time.monotonic())


def _has_words(s: str) -> bool:
    return bool(_WORD_RE.search(re.sub(r"\\[a-zA-Z]+", " ", s)))


_FUNC_CALL_RE = re.compile(r"\b(?!sym_)[A-Za-z]+\(")


def _symbols(src: str) -> set[str]:
    return set(re.findall(r"sym_[A-Za-z0-9_]+", src))


def _equiv_scalar(a: str, b: str, ctx: _Ctx) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    na, nb = _to_number(a), _to_number(b)
    if na is not None and nb is not None:
        return _num_close(na, nb)
    if _has_words(a) or _has_words(b):  # words: strings only (case-insensitive), never algebra
        return a.lower() == b.lower()
    sa, sb = _to_sympy_src(a), _to_sympy_src(b)
    if sa is None or sb is None:
        return False
    if _symbols(sa) != _symbols(sb) and not _FUNC_CALL_RE.search(sa + sb):
        return False  # rational functions in different variables cannot be equal
    return bool(_WORKER.compare("expr", sa, sb, ctx.remaining()))


def _parse_matrix(s: str) -> list[list[str]] | None:
    m = _MATRIX_RE.match(s)
    if not m:
        return None
    body = m.group(2).strip()
    rows = [r for r in _split_top(body, "\\\\")]
    while rows and not rows[-1].strip():
        rows.pop()
    return [[c.strip() for c in _split_top(r, "&")] for r in rows]


def _equiv_list(xs: list[str], ys: list[str], ctx: _Ctx, depth: int) -> bool:
    return len(xs) == len(ys) and all(_equiv(x, y, ctx, depth + 1) for x, y in zip(xs, ys))


def _equiv_unordered(xs: list[str], ys: list[str], ctx: _Ctx, depth: int) -> bool:
    xs = list(dict.fromkeys(xs))
    ys = list(dict.fromkeys(ys))
    if len(xs) != len(ys):
        return False
    free = list(range(len(ys)))
    for x in xs:
        hit = next((j for j in free if ys[j] == x), None)
        if hit is None:
            hit = next((j for j in free if _equiv(x, ys[j], ctx, depth + 1)), None)
        if hit is None:
            return False
        free.remove(hit)
    return True


def _set_elements(s: str) -> list[str] | None:
    """Elements of a set-like answer: ``\\{a,b\\}``, a bare list ``a,b``, or ``a \\pm b``."""
    if _is_set_literal(s):
        body = s[2:-2]
    elif _outer_group(s) is None and _parse_matrix(s) is None:
        body = s
    else:
        return None
    parts = [p for p in _split_top(body, ",")] if body else []
    out = []
    for p in parts:
        p = normalize(p)
        pm = re.search(r"\\(pm|mp)(?![a-zA-Z])", p)
        if pm and len(_split_top(p, "\\" + pm.group(1))) == 2:
            lhs, rhs = _split_top(p, "\\" + pm.group(1))
            lhs = lhs or "0"
            out += [normalize(f"{lhs}+{rhs}"), normalize(f"{lhs}-{rhs}")]
        else:
            out.append(p)
    return out


def _is_setlike(s: str) -> bool:
    if _is_set_literal(s):
        return True
    if _outer_group(s) is not None or _parse_matrix(s) is not None:
        return False
    return len(_split_top(s, ",")) > 1 or bool(re.search(r"\\(pm|mp)(?![a-zA-Z])", s))


def _equiv(a: str, b: str, ctx: _Ctx, depth: int = 0) -> bool:
    if a == b:
        return True
    if not a or not b or depth > 8:
        return False
    # matrices (a column/row vector may be written as a tuple)
    ma, mb = _parse_matrix(a), _parse_matrix(b)
    if ma is not None or mb is not None:
        if ma is None or mb is None:
            m, other = (ma, b) if ma is not None else (mb, a)
            g = _outer_group(other)
            if g is None or g[0] != "(" or g[2] != ")":
                return False
            elems = [normalize(x) for x in _split_top(g[1], ",")]
            flat = [normalize(c) for row in m for c in row]
            if not (all(len(r) == 1 for r in m) or len(m) == 1):
                return False
            return _equiv_list(flat, elems, ctx, depth)
        if len(ma) != len(mb) or any(len(r) != len(q) for r, q in zip(ma, mb)):
            return False
        return all(_equiv(normalize(x), normalize(y), ctx, depth + 1)
                   for r, q in zip(ma, mb) for x, y in zip(r, q))
    # sets, bare lists and +-
    if _is_setlike(a) or _is_setlike(b):
        ea, eb = _set_elements(a), _set_elements(b)
        if ea is None or eb is None:
            return False
        return _equiv_unordered(ea, eb, ctx, depth)
    # unions of intervals
    ua, ub = _split_top(a, "\\cup"), _split_top(b, "\\cup")
    if len(ua) > 1 or len(ub) > 1:
        return _equiv_unordered([normalize(x) for x in ua], [normalize(x) for x in ub], ctx, depth)
    # tuples and intervals
    ga, gb = _outer_group(a), _outer_group(b)
    ta = ga is not None and len(_split_top(ga[1], ",")) > 1
    tb = gb is not None and len(_split_top(gb[1], ",")) > 1
    if ta or tb:
        if not (ta and tb) or ga[0] != gb[0] or ga[2] != gb[2]:
            return False
        return _equiv_list([normalize(x) for x in _split_top(ga[1], ",")],
                           [normalize(x) for x in _split_top(gb[1], ",")], ctx, depth)
    # equations
    qa, qb = _split_top(a, "="), _split_top(b, "=")
    if len(qa) > 2 or len(qb) > 2:
        return False
    if len(qa) == 2 and len(qb) == 2:
        sides = [_to_sympy_src(x) for x in (*qa, *qb)]
        if any(x is None for x in sides):
            return False
        if _has_words(a) or _has_words(b):
            return False
        la, ra, lb, rb = sides
        return bool(_WORKER.compare("prop", f"({la})-({ra})", f"({lb})-({rb})", ctx.remaining()))
    if len(qa) == 2:  # "f(x) = 2x+1" against "2x+1"
        lhs, rhs = normalize(qa[0]), normalize(qa[1])
        if _equiv_scalar(rhs, b, ctx):
            return True
        return bool(re.fullmatch(r"[a-zA-Z]", rhs)) and _equiv_scalar(lhs, b, ctx)
    if len(qb) == 2:
        return False
    return _equiv_scalar(a, b, ctx)


_PERCENT_RE = re.compile(r"%|\bpercent\b", re.I)


def is_equiv(pred: str, gold: str, timeout: float = 2.0) -> bool:
    """Whether the answers ``pred`` and ``gold`` are equivalent (see the module docstring).

    ``timeout`` bounds the SymPy work of the whole comparison; past it the answer is False.
    Never raises: None or empty inputs are simply not equivalent.
    """
    try:
        if pred is None or gold is None:
            return False
        pred, gold = str(pred), str(gold)
        a, b = normalize(pred), normalize(gold)
        if not a or not b:
            return False
        ctx = _Ctx(float(timeout))
        if _equiv(a, b, ctx):
            return True
        # percentages: 50% also matches 0.5
        pa, pb = bool(_PERCENT_RE.search(pred)), bool(_PERCENT_RE.search(gold))
        if pa or pb:
            na, nb = _to_number(a), _to_number(b)
            if na is not None and nb is not None:
                if pa and not pb and _num_close(na / 100, nb):
                    return True
                if pb and not pa and _num_close(na, nb / 100):
                    return True
        return False
    except Exception:  # a grader must never crash a training run
        return False


def _looks_like_solution(gold: str) -> bool:
    return bool(_BOX_RE.search(gold)) or "####" in gold


def grade(completion: str, gold: str) -> dict:
    """Grade a completion against a gold answer (or a gold solution with ``\\boxed{}`` / ``####``).

    Returns ``{"correct": bool, "pred": extracted answer or None, "gold": normalised gold}``.
    """
    gold_s = "" if gold is None else str(gold)
    if _looks_like_solution(gold_s):
        gold_s = extract_answer(gold_s) or gold_s
    pred = extract_answer(completion) if isinstance(completion, str) else None
    correct = pred is not None and bool(gold_s.strip()) and is_equiv(pred, gold_s)
    return {"correct": bool(correct), "pred": pred, "gold": normalize(gold_s)}


def grade_boxed(completion: str, gold: str) -> dict:
    """:func:`grade`, but correct only when the answer stands in a closed ``\\boxed{}`` (the format the math
    system prompt asks for: a number echoed from the question, or a box cut off by the length limit, earns
    nothing). Adds ``boxed``."""
    boxed = has_boxed_answer(completion)
    g = grade(completion, gold)
    return {**g, "correct": bool(g["correct"] and boxed), "boxed": boxed}
