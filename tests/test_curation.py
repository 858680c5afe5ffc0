"""Curation (paper section 5.1.1, Figure 5): Ask-LLM against a direct computation from logits, semantic
dedup on planted duplicates in real text, the whole pipeline on small real sources (bad input included),
score caching across threshold changes, the datatrove path, and the CLI.

Text comes from the Python standard library on this machine (docstrings and source files): real prose and
code that every checkout has."""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
from pathlib import Path

import pytest
import torch

from mobilellm_r1.curation.askllm import (DOMAIN_PROMPTS, EDU_PROMPT, REASONING_PROMPT, AskLLM, PromptBuilder,
                                          transformer_last_logits)
from mobilellm_r1.curation.dedup import kmeans, semantic_dedup
from mobilellm_r1.curation.pipeline import CurationConfig, discover_sources, run_curation, top_fraction
from mobilellm_r1.curation.probing import assignment

from conftest import run_cli, run_cli_json

MODULES = ["json", "argparse", "difflib", "heapq", "bisect", "textwrap", "shutil", "zipfile", "csv", "calendar",
           "fractions", "decimal", "tarfile", "pickle", "sqlite3", "fnmatch", "statistics", "ipaddress"]


def real_docs(names=MODULES, min_chars=200) -> list[str]:
    out = []
    for n in names:
        doc = inspect.getdoc(importlib.import_module(n)) or ""
        if len(doc) >= min_chars:
            out.append(doc)
    return out


def real_code(n: int) -> list[str]:
    """Source files of small stdlib modules (real code)."""
    out = []
    for name in ("bisect", "fnmatch", "colorsys", "keyword", "glob", "heapq", "textwrap", "shlex"):
        out.append(Path(importlib.import_module(name).__file__).read_text())
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def smollm2():
    from mobilellm_r1.assets import smollm2_gguf
    from mobilellm_r1.curation.executor import load_lm

    try:
        smollm2_gguf(fetch=False)
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF asset not cached")
    return load_lm("smollm2")  # the same per-process cache the pipeline uses: loaded once for the module


@pytest.fixture(scope="module")
def embedder():
    from mobilellm_r1.curation.executor import _cached
    from mobilellm_r1.curation.embed import Embedder

    return _cached(("embed", "minilm", "cpu"), lambda: Embedder("minilm", "cpu", 32))


# ------------------------------------------------------------------------------------------- Ask-LLM

def test_askllm_score_is_p1_over_1_0_from_a_full_forward(smollm2):
    model, tok = smollm2
    texts = real_docs()[:2] + ["x = 1 + 1"]
    scorer = AskLLM(transformer_last_logits(model, model.cfg.pad_id), tok, max_doc_tokens=48,
                    context=model.cfg.max_seq_len, batch_size=3)  # one left-padded batch of 3 lengths
    got = scorer.score(texts, REASONING_PROMPT)
    edu = scorer.score(texts, EDU_PROMPT, kind="edu")
    b = PromptBuilder(tok, 48)
    one, zero = tok.encode("1"), tok.encode("0")
    assert len(one) == len(zero) == 1
    digits = [tok.encode(str(d))[0] for d in range(6)]
    for t, g, e in zip(texts, got, edu):
        p = b.build(t, REASONING_PROMPT)
        with torch.inference_mode():
            logits = model(torch.tensor([p.ids]))[0, -1]  # every position, no padding, no last_only
        direct = torch.softmax(logits[[one[0], zero[0]]].double(), 0)[0].item()
        assert g["score"] == pytest.approx(direct, abs=2e-4)
        with torch.inference_mode():
            logits = model(torch.tensor([b.build(t, EDU_PROMPT).ids]))[0, -1]
        pd = torch.softmax(logits[digits].double(), 0)
        assert e["score"] == pytest.approx(float(pd @ torch.arange(6.0, dtype=torch.float64)), abs=2e-3)
        assert 0.0 <= g["score"] <= 1.0 and 0.0 <= e["score"] <= 5.0
        assert g["n_tokens"] == len(tok.encode(t))
        assert g["truncated"] == (g["n_tokens"] > 48)
    assert [g["truncated"] for g in got] == [True, True, False]
    # The cut keeps the prompt inside the model's context: a tiny context forces a shorter document.
    small = AskLLM(transformer_last_logits(model, model.cfg.pad_id), tok, max_doc_tokens=4096, context=160)
    r = small.score(texts[:1], DOMAIN_PROMPTS["code"])
    assert r[0]["truncated"] and small.builder.max_doc_tokens < 160


def test_prompt_truncation_recorded_and_plain_layout(smollm2):
    _, tok = smollm2
    long = " ".join(real_docs())
    b = PromptBuilder(tok, 32)
    p = b.build(long, REASONING_PROMPT)
    assert p.truncated and p.n_doc_tokens > 1000 and len(p.ids) < 32 + b.overhead(REASONING_PROMPT) + 4
    plain = PromptBuilder(tok, 32, chat=False)
    # SmolLM2 splits " 1" into a space and a digit: the prompt ends in the space, the answer is the digit.
    assert len(tok.encode(" 1")) == 2 and plain.answer_ids(["1", "0"]) == [tok.encode("1")[0], tok.encode("0")[0]]
    ids = plain.build("abc", REASONING_PROMPT).ids
    assert tok.decode(ids).endswith("Answer: ") and ids[0] == tok.bos_id


# --------------------------------------------------------------------------------------------- dedup

def test_kmeans_is_deterministic_and_separates_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    x = torch.cat([c + 0.05 * torch.randn(20, 16, generator=g) for c in centres])
    a, b = kmeans(x, 3, seed=7), kmeans(x, 3, seed=7)
    assert torch.equal(a, b)
    for j in range(3):  # each true cluster lands in one k-means cluster
        assert len(set(a[j * 20:(j + 1) * 20].tolist())) == 1
    assert len(set(a.tolist())) == 3


def test_semantic_dedup_removes_planted_duplicates_and_nothing_else(embedder):
    docs = real_docs()
    n = len(docs)
    assert n >= 10
    near = docs[5].replace("\n", " ").replace(" the ", " a ", 2) + " See the library reference."
    planted = [docs[2], near, docs[8] + "\n"]  # exact, near (reworded), exact up to whitespace
    x = embedder.encode(docs + planted)
    res = semantic_dedup(x, threshold=0.9, k=4, seed=0)
    assert res.keep == [True] * n + [False] * 3
    assert res.dup_of[n:] == [2, 5, 8]
    assert res.max_sim[n] == pytest.approx(1.0, abs=1e-5)
    again = semantic_dedup(x, threshold=0.9, k=4, seed=0)
    assert again.keep == res.keep and again.cluster == res.cluster
    # Distinct docs really are below the threshold (so "nothing else" is not luck of the clustering).
    xn = torch.nn.functional.normalize(x[:n], dim=-1)
    off = xn @ xn.T - 2 * torch.eye(n)
    assert float(off.max()) < 0.9


def test_top_fraction_and_assignment():
    from mobilellm_r1.curation.pipeline import Sample

    s = [Sample("a", i, f"id{i}", f"t{i}", "d") for i in range(25)]
    score = {f"id{i}": float(i % 7) for i in range(25)}
    top = top_fraction(s, score, 0.1)  # ceil(2.5) = 3, ties broken by position, output in input order
    assert [x.pos for x in top] == [6, 13, 20]
    assert top_fraction([], score, 0.1) == []
    caps = {"cpython": ["code"], "sympy": ["code", "math"], "prose": ["knowledge"]}
    a = assignment(caps, {}, ["cpython", "sympy", "prose", "chat"])
    assert a == {"code": ["cpython", "sympy"], "math": ["sympy"], "knowledge": ["prose"]}
    a = assignment(caps, {"knowledge": ["prose", "chat"]}, ["cpython", "sympy", "prose", "chat"])
    assert a["knowledge"] == ["prose", "chat"] and a["code"] == ["cpython", "sympy"]
    with pytest.raises(ValueError, match="'nope'"):
        assignment(caps, {"math": ["nope"]}, ["cpython"])
    with pytest.raises(ValueError, match="'physics'"):
        assignment(caps, {"physics": ["cpython"]}, ["cpython"])


def test_config_from_recipe_is_strict(tmp_path):
    from mobilellm_r1.config import ConfigError, load_recipe, recipe_from_dict

    cfg = load_recipe("recipes/tiny.toml").section("curation", CurationConfig)
    assert cfg.scorer == "smollm2" and cfg.max_samples_per_source > 0
    r = recipe_from_dict({"curation": {"askllm_keep_fraction": 0.2, "assignment": {"math": ["a"]}}})
    c = r.section("curation", CurationConfig)
    assert c.askllm_keep_fraction == 0.2 and c.assignment == {"math": ["a"]}
    assert CurationConfig().quality_threshold == 4.0 and CurationConfig().askllm_keep_fraction == 0.1
    with pytest.raises(ConfigError, match="dedup_treshold"):
        recipe_from_dict({"curation": {"dedup_treshold": 0.9}}).section("curation", CurationConfig)
    with pytest.raises(ValueError, match="askllm_keep_fraction"):
        CurationConfig(askllm_keep_fraction=0.0)


# ------------------------------------------------------------------------------------------ pipeline

def make_sources(root: Path) -> Path:
    """Three real sources plus bad input: an empty source, a file with a non-UTF-8 line and a malformed
    line, and an over-long document the scorer must cut."""
    (root / "docs").mkdir(parents=True)
    with (root / "docs" / "part.jsonl").open("w") as f:
        for d in real_docs()[:5]:
            f.write(json.dumps({"text": d}) + "\n")
    (root / "code").mkdir()
    for i, src in enumerate(real_code(3)):
        (root / "code" / f"m{i}.py").write_text(src)
    (root / "empty").mkdir()
    (root / "empty" / "nothing.jsonl").write_text("")
    with gzip.open(root / "mixed.jsonl.gz", "wb") as f:  # a flat file is a source too (the corpus layout)
        f.write(json.dumps({"text": real_docs()[6]}).encode() + b"\n")
        f.write(b'{"text": "caf\xe9 au lait"}\n')  # latin-1 byte: invalid UTF-8
        f.write(b"{not json\n")
        f.write(json.dumps({"text": "\n\n".join(real_docs()[7:])}).encode() + b"\n")  # long
    (root / "manifest.json").write_text("{}")  # not data
    return root


def test_pipeline_end_to_end_with_bad_input_and_cached_rescoring(tmp_path, smollm2, embedder):
    src = make_sources(tmp_path / "src")
    sources = discover_sources(src)
    assert sorted(sources) == ["code", "docs", "empty", "mixed"]
    caps = {"code": ["code"], "docs": ["knowledge", "code"], "mixed": ["knowledge"]}
    cfg = CurationConfig(max_samples_per_source=4, chunk_chars=0, max_doc_tokens=48, quality_label_samples=6,
                         quality_threshold=-1.0, askllm_keep_fraction=0.5, domain_keep_fraction=1.0,
                         dedup_clusters=2, batch_size=4)
    out = tmp_path / "out"
    s = run_curation(cfg, sources, out, caps, progress=False)

    src_rep = s["sources"]
    assert src_rep["empty"]["samples"] == 0 and src_rep["empty"]["kept"]["representative"] == 0
    assert src_rep["mixed"]["read"]["invalid_utf8"] == 1 and src_rep["mixed"]["read"]["malformed"] == 1
    assert s["steps"]["read"]["invalid_utf8"] == 1
    assert src_rep["mixed"]["truncated"] >= 1 and s["steps"]["askllm"]["truncated"] >= 2
    assert src_rep["code"]["samples"] == 3 and src_rep["docs"]["samples"] == 4  # capped at 4
    for step in ("quality", "askllm", "domain", "dedup"):
        st = s["steps"][step]
        assert 0 <= st["kept"] <= st["in"] and "kept_fraction" in st
    assert s["steps"]["quality"]["in"] == 9 and s["steps"]["quality"]["kept"] == 9  # threshold -1: all pass
    assert s["steps"]["askllm"]["kept"] == 2 + 2 + 1  # ceil(0.5 n) per non-empty source
    assert s["steps"]["askllm"]["scored"] == 9 and s["steps"]["askllm"]["samples_per_s"] > 0
    assert "stand-in" in s["steps"]["quality"]["scorer"]

    import pyarrow.parquet as pq
    for name in ("quality", "quality_labels", "askllm", "domain", "dedup", "embed"):
        assert (out / "scores" / f"{name}.parquet").is_file()
    ask = pq.read_table(out / "scores" / "askllm.parquet").to_pylist()
    assert len(ask) == 9 and all(0 <= r["score"] <= 1 for r in ask)
    rep = {n: [json.loads(l) for l in (out / "representative" / f"{n}.jsonl").open()] for n in sources}
    assert [len(rep[n]) for n in ("code", "docs", "empty", "mixed")] == [2, 2, 0, 1]
    # Ask-LLM kept the top half of each source by its recorded score.
    by_id = {r["id"]: r["score"] for r in ask}
    for n in ("code", "docs"):
        kept = {r["id"] for r in rep[n]}
        others = [r for r in ask if r["source"] == n and r["id"] not in kept]
        assert min(by_id[i] for i in kept) >= max(r["score"] for r in others)
    probing = {c: [json.loads(l) for l in (out / "probing" / f"{c}.jsonl").open()] for c in ("code", "math", "knowledge")}
    assert {r["source"] for r in probing["code"]} == {"code", "docs"} and probing["math"] == []
    assert len(probing["knowledge"]) == 3 and all(r["text"] for r in probing["knowledge"])
    assert json.loads((out / "summary.json").read_text())["probing"]["code"]["total"] == 4

    # A stricter Ask-LLM share re-runs from the cached scores: no model call, fewer kept.
    cfg2 = CurationConfig(**{**cfg.__dict__, "askllm_keep_fraction": 0.25})
    s2 = run_curation(cfg2, sources, out, caps, progress=False)
    for step in ("askllm", "domain"):
        assert s2["steps"][step]["scored"] == 0 and s2["steps"][step]["cached"] > 0
    assert s2["steps"]["quality"]["labels_scored"] == 0 and s2["steps"]["embed"]["scored"] == 0
    assert s2["steps"]["askllm"]["kept"] == 1 + 1 + 1
    # Another prompt is another scorer: its table is not reused.
    from mobilellm_r1.curation.store import ScoreTable
    t = ScoreTable(out / "scores" / "askllm.parquet", "another scorer")
    assert t.stale and t.missing(list(by_id)) == sorted(by_id, key=list(by_id).index)


def test_datatrove_step_scores_like_the_local_path(tmp_path, smollm2):
    pytest.importorskip("datatrove")
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from mobilellm_r1.curation.executor import LocalExecutor, ScorerSpec, ScoreStep

    docs = real_docs()[:4]
    (tmp_path / "in").mkdir()
    for i in range(2):
        with (tmp_path / "in" / f"p{i}.jsonl").open("w") as f:
            for j, d in enumerate(docs[i * 2:(i + 1) * 2]):
                f.write(json.dumps({"text": d, "id": f"d{i * 2 + j}"}) + "\n")
    spec = ScorerSpec.make("askllm", model="smollm2", question=REASONING_PROMPT, answer="yes_no",
                           max_doc_tokens=32, batch_size=2, chat=True, device="cpu")
    LocalPipelineExecutor(
        pipeline=[JsonlReader(str(tmp_path / "in")), ScoreStep(spec, "askllm", batch_size=2),
                  JsonlWriter(str(tmp_path / "out"), compression=None)],
        tasks=2, workers=1, logging_dir=str(tmp_path / "logs"),
    ).run()
    got = {}
    for f in sorted((tmp_path / "out").glob("*.jsonl")):
        for line in f.open():
            r = json.loads(line)
            got[r["id"]] = r["metadata"]["askllm"]
    assert sorted(got) == ["d0", "d1", "d2", "d3"]
    with LocalExecutor(1, progress=False) as ex:
        local, _ = ex.map(spec, docs)
    for j in range(4):
        assert got[f"d{j}"] == pytest.approx(local[j]["score"], abs=1e-5)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from mobilellm_r1.cli import main

    assert main(["curate", "--sources", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "blank").mkdir()
    assert main(["curate", "--sources", str(tmp_path / "blank"), "--out", str(tmp_path / "o")]) == 2
    assert "no sub-folders or data files" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[curation]\ndedup_treshold = 0.5\n')
    r = run_cli("curate", "--recipe", bad, "--sources", tmp_path / "blank", "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "dedup_treshold" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_end_to_end_json(tmp_path):
    src = make_sources(tmp_path / "src")
    recipe = tmp_path / "r.toml"
    recipe.write_text("""
[[data.sources]]
name = "docs"
capabilities = ["knowledge"]
[curation]
max_samples_per_source = 3
max_doc_tokens = 32
quality_label_samples = 4
quality_threshold = -1.0
""")
    s = run_cli_json("curate", "--recipe", recipe, "--sources", src, "--out", tmp_path / "o", "--no-progress")
    assert s["steps"]["askllm"]["in"] == 8 and s["probing"]["knowledge"]["by_source"] == {"docs": 1}
    assert (tmp_path / "o" / "probing" / "knowledge.jsonl").is_file()
