"""Atomic file writes, used for every file the project writes that a later step reads.

A file is written under a temporary name in its own folder and moved into place with ``os.replace``, so a
crash or a kill leaves the old file or the new one, never a truncated one, and a resumed run can trust
whatever it finds. The temporary name is unique per process and call, so concurrent writers (ranks,
worker processes) do not clobber each other's half-written files. A write that finds the disk full (or a
quota, or a file-size limit) removes its temporary file and raises :class:`~mobilellm_r1.faults.DiskFullError`
naming the file and the bytes it needed.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)

@contextmanager
def atomic_path(path: str | Path, size: int = 0) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (for writers that take a file name: parquet,
    ``torch.save``, a tokenizer's ``save``); on success it replaces ``path``, on error it is removed.
    ``size``: the bytes the caller will write, for the message of a full disk (else what was written)."""
    from .faults import disk_full_error

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the permissions open() would
        os.replace(tmp, path)
    except Exception as e:
        full = disk_full_error(e, path.name, path.parent, size or _size(tmp))
        if full is not None:
            raise full from None
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def _size(path: str | Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    data = text.encode("utf-8")
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def jsonable(x: Any) -> Any:
    """``json.dumps``'s fallback: numpy numbers and arrays as Python values, anything else (paths, ...) as text."""
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy scalars/arrays (and tensors)
        return x.tolist()
    return str(x)


def write_json(path: str | Path, obj: Any, indent: int | None = 1, default: Any = jsonable) -> Path:
    """JSON with non-ASCII kept as is."""
    return write_text(path, json.dumps(obj, indent=indent, default=default, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Any) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(path)
