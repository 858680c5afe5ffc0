"""Hierarchical rejection sampling (paper section 5.1.1, Figure 5): every source corpus D_i is narrowed to
a small representative set D^R_i by

    quality filter -> Ask-LLM (reasoning) -> Ask-LLM (domain) -> semantic dedup -> cap,

and the D^R_i are combined into capability-probing sets D^P for Code, Math and Knowledge.

Each step scores only what survived the step before (cheap filters first, so the LLM reads a fraction of
the corpus) and stores its per-sample scores in ``scores/<step>.parquet``; a re-run with other thresholds
reuses them. Outputs under ``out``: ``representative/<source>.jsonl``, ``probing/{code,math,knowledge}.jsonl``
(field ``text``), ``scores/*.parquet`` and ``summary.json`` (counts kept per step and per source,
samples/s per step).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json, write_jsonl
from ..config import to_dict
from ..data.corpus import chunk_paragraphs
from ..data.sources import JSONL_SUFFIXES, PARQUET_SUFFIXES, TEXT_SUFFIXES, ReadStats, group_inputs, iter_documents
from .askllm import DOMAIN_PROMPTS, EDU_PROMPT, REASONING_PROMPT
from .dedup import semantic_dedup
from .executor import LocalExecutor, ScorerSpec
from .probing import CAPABILITIES, assignment, build_probing_sets, capabilities_of
from .quality import RidgeQualityHead, edu_row
from .store import ScoreTable

STEPS = ("quality", "askllm", "domain", "dedup")


@dataclass
class CurationConfig:
    """``[curation]`` of a recipe. Paper numbers: quality > 4 (FineWeb-Edu scale), Ask-LLM top 10% per
    source, D^R_i capped near 10,000 samples."""

    scorer: str = "smollm2"  # Ask-LLM model: anything load_any takes
    embedder: str = "minilm"  # sentence-transformers dir, or the offline MiniLM package
    quality_classifier: str = ""  # local FineWeb-Edu classifier dir; "" = the offline stand-in (quality.py)
    quality_threshold: float = 4.0  # keep score > threshold
    quality_use_int_score: bool = False  # threshold the rounded 0-5 score instead of the float
    quality_label_samples: int = 64  # stand-in: samples the Ask-LLM rates 0-5 to train the head on
    quality_ridge_l2: float = 1.0
    askllm_keep_fraction: float = 0.10  # top share per source
    reasoning_prompt: str = ""  # "" = askllm.REASONING_PROMPT
    domain_prompts: dict[str, str] = field(default_factory=dict)  # code/math/knowledge/combined overrides
    domain_keep_fraction: float = 0.5  # top share per source by its best capability score
    assignment: dict[str, list[str]] = field(default_factory=dict)  # capability -> sources (overrides recipe)
    max_doc_tokens: int = 512  # scorer's cut; longer samples are truncated and counted
    chat: bool = True  # lay prompts out in the scorer's chat template (when it has one)
    batch_size: int = 8
    dedup_threshold: float = 0.9  # cosine similarity above which a sample duplicates an earlier one
    dedup_clusters: int = 16
    cap_per_source: int = 10_000  # |D^R_i| at most (paper: ~10k)
    max_samples_per_source: int = 0  # input cap (seeded sample of chunks); 0 = every chunk
    chunk_chars: int = 0  # split documents at paragraphs into ~this many characters; 0 = whole documents
    seed: int = 0
    workers: int = 1  # local scoring processes
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("askllm_keep_fraction", "domain_keep_fraction"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"[curation] {name} must be in (0, 1], got {v}")
        if not -1.0 <= self.dedup_threshold <= 1.0:
            raise ValueError(f"[curation] dedup_threshold is a cosine similarity in [-1, 1], got {self.dedup_threshold}")
        bad = sorted(set(self.domain_prompts) - set(DOMAIN_PROMPTS))
        if bad:
            raise ValueError(f"[curation] domain_prompts: unknown key {bad[0]!r} (known: {', '.join(DOMAIN_PROMPTS)})")
        if self.max_doc_tokens < 1 or self.cap_per_source < 1:
            raise ValueError("[curation] max_doc_tokens and cap_per_source must be positive")


@dataclass
class Sample:
    source: str
    pos: int  # position in the source's sample list (deterministic order)
    id: str  # content hash: the score caches' key
    text: str
    doc: str  # the document it was cut from


def sample_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------- input

DATA_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


def discover_sources(root: str | Path) -> dict[str, list[str]]:
    """One source per sub-folder of ``root``, and one per data file directly in it (the embedded corpus's
    flat ``<source>.jsonl[.gz]`` layout); ``manifest.json`` and hidden files are not data."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--sources {root}: not a directory")
    entries = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name == "manifest.json":
            continue
        if p.is_dir() or any(p.name.lower().endswith(s) for s in DATA_SUFFIXES):
            entries.append(p)
    out = group_inputs(entries)
    if not out:
        raise FileNotFoundError(f"--sources {root}: no sub-folders or data files (one source each)")
    return out


def read_source(name: str, paths: list[str], cfg: CurationConfig) -> tuple[list[Sample], dict]:
    """The source's samples (chunks of its documents, capped by a seeded draw) and its read report."""
    stats = ReadStats()
    samples: list[Sample] = []
    n_docs = 0
    for p in paths:
        for doc in iter_documents(p, source=name, stats=stats):
            n_docs += 1
            pieces = chunk_paragraphs(doc.text, cfg.chunk_chars) if cfg.chunk_chars else [doc.text]
            for piece in pieces:
                if piece.strip():
                    samples.append(Sample(name, 0, sample_id(piece), piece, doc.id))
    n_all = len(samples)
    if cfg.max_samples_per_source and n_all > cfg.max_samples_per_source:
        rng = random.Random(cfg.seed * 1_000_003 + zlib.crc32(name.encode()))
        picked = sorted(rng.sample(range(n_all), cfg.max_samples_per_source))
        samples = [samples[i] for i in picked]
    for i, s in enumerate(samples):
        s.pos = i
    return samples, {"docs": n_docs, "chunks": n_all, "samples": len(samples),
                     "input_capped": len(samples) < n_all, "read": stats.as_dict()}


# ----------------------------------------------------------------------------------------------- steps


def top_fraction(samples: list[Sample], score: dict[str, float], frac: float) -> list[Sample]:
    """The best ceil(frac * n) samples by score (ties: earlier first), returned in input order."""
    if not samples:
        return []
    k = max(1, math.ceil(frac * len(samples)))
    ranked = sorted(samples, key=lambda s: (-score[s.id], s.pos))[:k]
    return sorted(ranked, key=lambda s: s.pos)


class _Runner:
    def __init__(self, cfg: CurationConfig, out: Path, executor: LocalExecutor):
        self.cfg, self.out, self.ex = cfg, out, executor
        self.steps: dict[str, dict] = {}

    def askllm_spec(self, question: str, answer: str = "yes_no") -> ScorerSpec:
        c = self.cfg
        return ScorerSpec.make("askllm", model=c.scorer, question=question, answer=answer,
                               max_doc_tokens=c.max_doc_tokens, batch_size=c.batch_size, chat=c.chat,
                               device=c.device)

    def cached_scores(self, table: ScoreTable, spec: ScorerSpec, samples: list[Sample], key: str, desc: str
                      ) -> tuple[int, int, float]:
        """Score the samples ``table`` lacks; returns (scored, cached, seconds)."""
        todo = table.missing([s.id for s in samples], key)
        by_id = {s.id: s for s in samples}
        rows, secs = self.ex.map(spec, [by_id[i].text for i in todo], desc=desc)
        for i, r in zip(todo, rows):
            table.put(i, key, {"source": by_id[i].source, **r})
        if todo or table.stale or not table.path.is_file():
            table.save()
        return len(todo), len({s.id for s in samples}) - len(todo), secs

    def record(self, step: str, n_in: int, kept: int, scored: int, cached: int, secs: float, **extra) -> None:
        self.steps[step] = {"in": n_in, "kept": kept, "kept_fraction": kept / n_in if n_in else 0.0,
                            "scored": scored, "cached": cached, "seconds": round(secs, 3),
                            "samples_per_s": round(scored / secs, 3) if secs > 0 and scored else None, **extra}

    def embed_spec(self) -> ScorerSpec:
        return ScorerSpec.make("embed", embedder=self.cfg.embedder, device=self.cfg.device, batch_size=32)

    def embeddings(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        spec = self.embed_spec()
        table = ScoreTable(self.out / "scores" / "embed.parquet", spec.signature())
        scored, cached, secs = self.cached_scores(table, spec, samples, "", "embed")
        self.steps.setdefault("embed", {"scored": 0, "cached": 0, "seconds": 0.0})
        e = self.steps["embed"]
        e["scored"] += scored
        e["cached"] += cached
        e["seconds"] = round(e["seconds"] + secs, 3)
        e["samples_per_s"] = round(e["scored"] / e["seconds"], 3) if e["seconds"] > 0 and e["scored"] else None
        return {s.id: torch.tensor(table.get(s.id)["embedding"]) for s in samples}

    # step 1 -----------------------------------------------------------------------------------------
    def quality(self, per_source: dict[str, list[Sample]]) -> tuple[dict[str, list[Sample]], dict[str, float]]:
        cfg = self.cfg
        alls = [s for v in per_source.values() for s in v]
        extra: dict[str, Any] = {}
        if cfg.quality_classifier:
            spec = ScorerSpec.make("fineweb", path=cfg.quality_classifier, device=cfg.device)
            table = ScoreTable(self.out / "scores" / "quality.parquet", spec.signature())
            scored, cached, secs = self.cached_scores(table, spec, alls, "", "quality (FineWeb-Edu)")
            rows = {s.id: table.get(s.id) for s in alls}
            extra["scorer"] = f"FineWeb-Edu classifier {cfg.quality_classifier}"
        else:
            # Stand-in (quality.py): the Ask-LLM rates a seeded, source-balanced subset 0-5; a ridge head on
            # MiniLM embeddings learns those ratings and scores everything.
            t0 = time.perf_counter()
            emb = self.embeddings(alls)
            spec = self.askllm_spec(EDU_PROMPT, answer="edu")
            labels = ScoreTable(self.out / "scores" / "quality_labels.parquet", spec.signature())
            chosen = label_subset(per_source, cfg.quality_label_samples, cfg.seed)
            scored, cached, secs = self.cached_scores(labels, spec, chosen, "", "quality labels (Ask-LLM 0-5)")
            rows = {}
            if chosen:
                ids = sorted({s.id for s in chosen})
                head = RidgeQualityHead.train(torch.stack([emb[i] for i in ids]),
                                              torch.tensor([labels.get(i)["score"] for i in ids]),
                                              cfg.quality_ridge_l2, seed=cfg.seed)
                uniq = sorted({s.id for s in alls})
                rows = dict(zip(uniq, head.score(torch.stack([emb[i] for i in uniq]))))
                extra["head"] = head.fit
            sig = (f"stand-in|{labels.signature}|{self.embed_spec().signature()}|l2={cfg.quality_ridge_l2}"
                   f"|n={cfg.quality_label_samples}|seed={cfg.seed}")
            table = ScoreTable(self.out / "scores" / "quality.parquet", sig)
            table.rows.clear()  # derived from the cached labels and embeddings: rewritten every run
            for s in alls:
                table.put(s.id, "", {"source": s.source, **rows.get(s.id, edu_row(0.0))})
            table.save()
            extra["scorer"] = (f"stand-in: ridge head on {cfg.embedder} embeddings trained on {cfg.scorer} "
                               f"0-5 ratings of {len(chosen)} samples (not the FineWeb-Edu classifier)")
            extra.update(labels_scored=scored, labels_cached=cached, labels_seconds=round(secs, 3),
                         labels_samples_per_s=round(scored / secs, 3) if secs > 0 and scored else None)
            secs = time.perf_counter() - t0
            scored, cached = len({s.id for s in alls}), 0  # the head re-scores everything (cheap)
        key = "int_score" if cfg.quality_use_int_score else "score"
        scores = {s.id: float(table.get(s.id)[key]) for s in alls}
        kept = {src: [s for s in v if scores[s.id] > cfg.quality_threshold] for src, v in per_source.items()}
        extra["threshold"] = f"{key} > {cfg.quality_threshold}"
        self.record("quality", len(alls), sum(map(len, kept.values())), scored, cached, secs, **extra)
        return kept, scores

    # step 2 -----------------------------------------------------------------------------------------
    def askllm(self, per_source: dict[str, list[Sample]]) -> tuple[dict[str, list[Sample]], dict[str, dict]]:
        spec = self.askllm_spec(self.cfg.reasoning_prompt or REASONING_PROMPT)
        table = ScoreTable(self.out / "scores" / "askllm.parquet", spec.signature())
        allsamp = [s for v in per_source.values() for s in v]
        scored, cached, secs = self.cached_scores(table, spec, allsamp, "", "Ask-LLM (reasoning)")
        rows = {s.id: table.get(s.id) for s in allsamp}
        scores = {i: r["score"] for i, r in rows.items()}
        kept = {src: top_fraction(v, scores, self.cfg.askllm_keep_fraction) for src, v in per_source.items()}
        truncated = sum(1 for s in allsamp if rows[s.id]["truncated"])
        self.record("askllm", len(allsamp), sum(map(len, kept.values())), scored, cached, secs,
                    truncated=truncated, max_doc_tokens=self.cfg.max_doc_tokens)
        return kept, rows

    # step 3 -----------------------------------------------------------------------------------------
    def domain(self, per_source: dict[str, list[Sample]], assign: dict[str, list[str]]
               ) -> tuple[dict[str, list[Sample]], dict[str, dict[str, float]]]:
        prompts = {**DOMAIN_PROMPTS, **self.cfg.domain_prompts}
        base = self.askllm_spec("")
        table = ScoreTable(self.out / "scores" / "domain.parquet", repr((base.signature(), sorted(prompts.items()))))
        scored = cached = 0
        secs = 0.0
        by_sample: dict[str, dict[str, float]] = {}
        for key in list(CAPABILITIES) + ["combined"]:
            todo = [s for src, v in per_source.items() for s in v
                    if key in (capabilities_of(src, assign) or ["combined"])]
            if not todo:
                continue
            a, b, t = self.cached_scores(table, self.askllm_spec(prompts[key]), todo, key, f"Ask-LLM ({key})")
            scored, cached, secs = scored + a, cached + b, secs + t
            for s in todo:
                by_sample.setdefault(s.id, {})[key] = table.get(s.id, key)["score"]
        best = {i: max(v.values()) for i, v in by_sample.items()}
        kept = {src: top_fraction(v, best, self.cfg.domain_keep_fraction) for src, v in per_source.items()}
        self.record("domain", sum(map(len, per_source.values())), sum(map(len, kept.values())), scored, cached,
                    secs, prompts={src: capabilities_of(src, assign) or ["combined"] for src in per_source})
        return kept, by_sample

    # step 4 -----------------------------------------------------------------------------------------
    def dedup(self, per_source: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
        cfg = self.cfg
        allsamp = [s for v in per_source.values() for s in v]
        emb = self.embeddings(allsamp)
        t0 = time.perf_counter()
        table = ScoreTable(self.out / "scores" / "dedup.parquet", "derived")
        kept: dict[str, list[Sample]] = {}
        for src, v in per_source.items():
            if not v:
                kept[src] = []
                continue
            res = semantic_dedup(torch.stack([emb[s.id] for s in v]), cfg.dedup_threshold, cfg.dedup_clusters,
                                 cfg.seed)
            kept[src] = [s for s, k in zip(v, res.keep) if k]
            for j, s in enumerate(v):
                table.rows[(s.id, f"{src}:{s.pos}")] = {
                    "id": s.id, "key": f"{src}:{s.pos}", "source": src, "cluster": res.cluster[j],
                    "max_sim": res.max_sim[j], "kept": res.keep[j],
                    "dup_of": v[res.dup_of[j]].id if res.dup_of[j] >= 0 else ""}
        table.save()
        self.record("dedup", len(allsamp), sum(map(len, kept.values())), 0, 0, time.perf_counter() - t0,
                    threshold=cfg.dedup_threshold, clusters=cfg.dedup_clusters)
        return kept


def label_subset(per_source: dict[str, list[Sample]], n: int, seed: int) -> list[Sample]:
    """A seeded draw of about ``n`` samples spread evenly over the non-empty sources."""
    nonempty = [src for src, v in per_source.items() if v]
    if not nonempty or n <= 0:
        return []
    each = max(1, math.ceil(n / len(nonempty)))
    out = []
    for src in nonempty:
        v = per_source[src]
        rng = random.Random(seed * 7919 + zlib.crc32(src.encode()))
        out += [v[i] for i in sorted(rng.sample(range(len(v)), min(each, len(v))))]
    return out


def run_curation(cfg: CurationConfig, sources: dict[str, list[str]], out: str | Path,
                 source_caps: dict[str, list[str]] | None = None, progress: bool = True) -> dict:
    """Run the whole Figure-5 pipeline; returns (and writes to ``out/summary.json``) the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    assign = assignment(source_caps or {}, cfg.assignment, list(sources))
    per_source: dict[str, list[Sample]] = {}
    report: dict[str, dict] = {}
    t0 = time.perf_counter()
    for name, paths in sources.items():
        per_source[name], report[name] = read_source(name, paths, cfg)
    read_secs = time.perf_counter() - t0

    with LocalExecutor(cfg.workers, shard_size=max(cfg.batch_size * 2, 16), progress=progress) as ex:
        run = _Runner(cfg, out, ex)
        q_kept, q_scores = run.quality(per_source)
        a_kept, a_rows = run.askllm(q_kept)
        d_kept, d_scores = run.domain(a_kept, assign)
        dd_kept = run.dedup(d_kept)

    representative: dict[str, list[dict]] = {}
    for src, v in dd_kept.items():
        best = {s.id: max(d_scores[s.id].values()) for s in v}
        chosen = sorted(sorted(v, key=lambda s: (-best[s.id], s.pos))[: cfg.cap_per_source], key=lambda s: s.pos)
        representative[src] = [{"text": s.text, "id": s.id, "source": src, "doc": s.doc,
                                "quality": q_scores[s.id], "askllm": a_rows[s.id]["score"],
                                "domain": d_scores[s.id]} for s in chosen]
        write_jsonl(out / "representative" / f"{src}.jsonl", representative[src])
    sets, counts = build_probing_sets(representative, assign)
    for cap, rows in sets.items():
        write_jsonl(out / "probing" / f"{cap}.jsonl", rows)

    for src in sources:
        r = report[src]
        r["kept"] = {"quality": len(q_kept[src]), "askllm": len(a_kept[src]), "domain": len(d_kept[src]),
                     "dedup": len(dd_kept[src]), "representative": len(representative[src])}
        r["truncated"] = sum(1 for s in q_kept[src] if a_rows[s.id]["truncated"])
        r["capabilities"] = capabilities_of(src, assign)
    total_read = ReadStats()
    for src in sources:
        total_read.merge(_stats_from(report[src]["read"]))
    summary = {
        "out": str(out),
        "steps": {"read": {"samples": sum(len(v) for v in per_source.values()), "seconds": round(read_secs, 3),
                           **{k: v for k, v in total_read.as_dict().items() if k != "examples"}},
                  **run.steps},
        "sources": report,
        "assignment": assign,
        "probing": counts,
        "seconds": round(time.perf_counter() - t_start, 3),
        "config": to_dict(cfg),
    }
    write_json(out / "summary.json", summary)
    return summary


def _stats_from(d: dict) -> ReadStats:
    s = ReadStats()
    for k in ("files", "docs", "malformed", "invalid_utf8", "missing_field", "empty"):
        setattr(s, k, d[k])
    s.examples = list(d["examples"])
    return s
