"""Per-step score tables, ``scores/<step>.parquet``: one row per (sample id, key) with the score and the
scorer's extra fields, plus the scorer's signature in the file's metadata. A re-run scores only ids that
are missing, so a changed threshold costs no model time; a changed scorer (model, prompt, cut length)
invalidates the table. Writes are atomic (temp file + ``os.replace``)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path

SIG_KEY = b"mobilellm_r1.signature"


class ScoreTable:
    def __init__(self, path: Path, signature: str):
        self.path = Path(path)
        self.signature = signature
        self.rows: dict[tuple[str, str], dict] = {}
        self.stale = False  # an existing file was made by another scorer
        if self.path.is_file():
            table = pq.read_table(self.path)
            meta = table.schema.metadata or {}
            if meta.get(SIG_KEY, b"").decode() == signature:
                for r in table.to_pylist():
                    self.rows[(r["id"], r.get("key", ""))] = r
            else:
                self.stale = True

    def get(self, sid: str, key: str = "") -> dict | None:
        return self.rows.get((sid, key))

    def missing(self, ids: list[str], key: str = "") -> list[str]:
        seen, out = set(), []
        for i in ids:
            if (i, key) not in self.rows and i not in seen:
                seen.add(i)
                out.append(i)
        return out

    def put(self, sid: str, key: str, row: dict) -> None:
        self.rows[(sid, key)] = {"id": sid, "key": key, **row}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = sorted(self.rows.values(), key=lambda r: (r["key"], r["id"]))
        table = pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.string()),
                                                                   "key": pa.array([], pa.string())})
        table = table.replace_schema_metadata({SIG_KEY: self.signature.encode()})
        with atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)
