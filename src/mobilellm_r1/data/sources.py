"""Readers that turn files into documents, counting every record they cannot use.

Formats: JSON lines (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, also ``.json`` lines), Parquet, plain text
(``.txt``/``.md``/``.rst``/``.py``/... one document per file) in folders of any depth, and Hugging Face
``datasets`` (streaming) for users with internet, given as ``hf:NAME[:CONFIG][@SPLIT]``.

Bad records never stop a run and are never silently lost: a line that is not JSON, not valid UTF-8, lacks
the text field, or holds an empty document is skipped *and counted* in :class:`ReadStats`, with the first
few locations kept for the report.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".tex", ".py", ".text", ".html", ".htm")
MAX_EXAMPLES = 5


@dataclass
class Document:
    text: str
    source: str
    id: str


@dataclass
class ReadStats:
    files: int = 0
    docs: int = 0
    malformed: int = 0  # not JSON / not an object / unreadable row
    invalid_utf8: int = 0
    missing_field: int = 0
    empty: int = 0
    examples: list[str] = field(default_factory=list)

    def problem(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{kind} at {where}")

    @property
    def skipped(self) -> int:
        return self.malformed + self.invalid_utf8 + self.missing_field + self.empty

    def merge(self, other: "ReadStats") -> None:
        for k in ("files", "docs", "malformed", "invalid_utf8", "missing_field", "empty"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.examples = (self.examples + other.examples)[:MAX_EXAMPLES]

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("files", "docs", "malformed", "invalid_utf8", "missing_field",
                                               "empty", "skipped", "examples")}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def source_name(path: str | Path) -> str:
    """A source is named after its input folder, or the file's stem without data suffixes."""
    p = Path(path)
    if str(path).startswith("hf:"):
        return str(path)[3:].split("@")[0].replace("/", "_").replace(":", "_")
    if p.is_dir():
        return p.resolve().name
    name = p.name
    for suf in JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


def list_files(path: str | Path) -> list[Path]:
    """Readable data files under ``path`` (a file or a folder, recursively), in sorted order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    known = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
    return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".") and _suffix(f) in known)


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb")))
    return path.open("rb")


def record_text(rec: dict, text_field: str) -> str | None:
    """The text of a record: ``text_field``, else a chat ``messages`` list rendered as plain turns."""
    val = rec.get(text_field)
    if isinstance(val, str):
        return val
    msgs = rec.get("messages")
    if val is None and isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs):
        return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in msgs)
    return None


def iter_jsonl(path: Path, source: str, text_field: str, stats: ReadStats) -> Iterator[Document]:
    with _open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.problem("invalid_utf8", where)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                stats.problem("malformed", where)
                continue
            if not isinstance(rec, dict):
                stats.problem("malformed", where)
                continue
            text = record_text(rec, text_field)
            if text is None:
                stats.problem("missing_field", where)
                continue
            if not text.strip():
                stats.problem("empty", where)
                continue
            stats.docs += 1
            yield Document(text=text, source=source, id=str(rec.get("id", f"{path.name}:{n}")))


def iter_parquet(path: Path, source: str, text_field: str, stats: ReadStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for val in batch.column(0).to_pylist():
            row += 1
            where = f"{path}:row {row}"
            if not isinstance(val, str):
                stats.problem("missing_field" if val is None else "malformed", where)
                continue
            if not val.strip():
                stats.problem("empty", where)
                continue
            stats.docs += 1
            yield Document(text=val, source=source, id=f"{path.name}:{row}")


def iter_text_file(path: Path, source: str, stats: ReadStats, root: Path | None = None) -> Iterator[Document]:
    data = path.read_bytes()
    where = str(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.problem("invalid_utf8", where)
        return
    if not text.strip():
        stats.problem("empty", where)
        return
    stats.docs += 1
    yield Document(text=text, source=source, id=str(path.relative_to(root)) if root else path.name)


def hf_rows(spec: str, **load_kwargs) -> Iterator[dict]:
    """Records of ``hf:NAME[:CONFIG][@SPLIT]`` streamed with ``datasets`` (needs internet unless NAME is a
    local builder such as ``json`` with ``data_files``)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hub datasets need the `datasets` package: pip install 'mobilellm-r1[hub]'") from e
    body = spec[3:]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    yield from datasets.load_dataset(name, config or None, split=split or "train", streaming=True, **load_kwargs)


def iter_hf(spec: str, source: str, text_field: str, stats: ReadStats, **load_kwargs) -> Iterator[Document]:
    """Documents of a hub dataset (see :func:`hf_rows`)."""
    for n, rec in enumerate(hf_rows(spec, **load_kwargs)):
        where = f"{spec}:{n}"
        text = record_text(rec, text_field) if isinstance(rec, dict) else None
        if text is None:
            stats.problem("missing_field", where)
            continue
        if not text.strip():
            stats.problem("empty", where)
            continue
        stats.docs += 1
        yield Document(text=text, source=source, id=str(rec.get("id", n)))


def iter_documents(
    path: str | Path, text_field: str = "text", source: str | None = None, stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Documents from one input (file, folder or ``hf:`` spec), in a deterministic order."""
    stats = stats if stats is not None else ReadStats()
    source = source or source_name(path)
    if str(path).startswith("hf:"):
        stats.files += 1
        yield from iter_hf(str(path), source, text_field, stats)
        return
    root = Path(path) if Path(path).is_dir() else None
    for f in list_files(path):
        stats.files += 1
        suf = _suffix(f)
        if suf in JSONL_SUFFIXES:
            yield from iter_jsonl(f, source, text_field, stats)
        elif suf in PARQUET_SUFFIXES:
            yield from iter_parquet(f, source, text_field, stats)
        else:
            yield from iter_text_file(f, source, stats, root)


def group_inputs(paths: Iterable[str | Path]) -> dict[str, list[str]]:
    """Map each input to its source name; inputs that share a name are one source."""
    out: dict[str, list[str]] = {}
    for p in paths:
        out.setdefault(source_name(p), []).append(str(p))
    return out
