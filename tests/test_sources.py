import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from mobilellm_r1.data.sources import ReadStats, group_inputs, iter_documents, source_name

LINES = [b'{"text": "first doc"}', b'not json at all', b'{"text": ""}', b'{"body": "no text field"}',
         b'{"text": "bad \xff\xfe bytes"}', b'[1, 2, 3]', b'', b'{"text": "second doc", "id": "x2"}',
         b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}']


def _check(docs, stats):
    assert [d.text for d in docs] == ["first doc", "second doc", "user: hi\n\nassistant: yo"]
    assert docs[1].id == "x2"
    assert (stats.docs, stats.malformed, stats.invalid_utf8, stats.missing_field, stats.empty) == (3, 2, 1, 1, 1)
    assert stats.skipped == 5 and len(stats.examples) == 5


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_variants_count_every_bad_line(tmp_path, suffix):
    raw = b"\n".join(LINES) + b"\n"
    path = tmp_path / f"web{suffix}"
    if suffix.endswith(".gz"):
        raw = gzip.compress(raw)
    elif suffix.endswith(".zst"):
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    stats = ReadStats()
    docs = list(iter_documents(path, stats=stats))
    _check(docs, stats)
    assert {d.source for d in docs} == {"web"} and source_name(path) == "web"


def test_parquet_and_text_tree(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "  ", "b"]}), tmp_path / "p.parquet")
    stats = ReadStats()
    assert [d.text for d in iter_documents(tmp_path / "p.parquet", stats=stats)] == ["a", "b"]
    assert (stats.missing_field, stats.empty) == (1, 1)
    with pytest.raises(ValueError, match="no column 'content'"):
        list(iter_documents(tmp_path / "p.parquet", text_field="content"))

    tree = tmp_path / "docs"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha")
    (tree / "sub" / "b.md").write_text("beta")
    (tree / "sub" / "c.txt").write_bytes(b"\xff\xfe broken")
    (tree / "empty.txt").write_text("\n\n")
    (tree / "ignored.bin").write_bytes(b"\x00")
    stats = ReadStats()
    docs = list(iter_documents(tree, stats=stats))
    assert [(d.text, d.id, d.source) for d in docs] == [("alpha", "a.txt", "docs"), ("beta", "sub/b.md", "docs")]
    assert (stats.invalid_utf8, stats.empty, stats.files) == (1, 1, 4)


def test_missing_input_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        list(iter_documents(tmp_path / "nope"))


def test_group_inputs_names_sources_by_stem_or_folder(tmp_path):
    (tmp_path / "code").mkdir()
    g = group_inputs([tmp_path / "math.jsonl.gz", tmp_path / "code", tmp_path / "x" / "math.jsonl"])
    assert g == {"math": [str(tmp_path / "math.jsonl.gz"), str(tmp_path / "x" / "math.jsonl")],
                 "code": [str(tmp_path / "code")]}


def test_hf_datasets_streaming_on_local_files(tmp_path, monkeypatch):
    """The hub path is the real `datasets` streaming loader; offline it reads local data files."""
    pytest.importorskip("datasets")
    from mobilellm_r1.data import sources

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "", "three"]) + "\n")
    stats = ReadStats()
    docs = list(sources.iter_hf("hf:json@train", "local", "text", stats, data_files=str(f)))
    assert [d.text for d in docs] == ["one", "three"] and stats.empty == 1
