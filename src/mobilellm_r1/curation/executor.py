"""Where curation's scoring runs: a local process pool by default, or datatrove (Local/Slurm/Ray executors)
through :class:`ScoreStep`.

A scorer travels as a :class:`ScorerSpec` (a name and plain parameters), never as a loaded model: each
worker process builds it once and keeps it for every later shard and step (models are cached per process
by their spec), so a pool pays a model load per worker, not per shard.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import multiprocessing as mp

Rows = list[dict]

_CACHE: dict[tuple, Any] = {}


@dataclass(frozen=True)
class ScorerSpec:
    """``kind``: ``askllm`` (params: model, question, answer ("yes_no" | "edu"), max_doc_tokens, batch_size,
    chat), ``embed`` (params: embedder, batch_size) or ``fineweb`` (params: path, batch_size)."""

    kind: str
    params: tuple = field(default_factory=tuple)  # sorted (key, value) pairs: hashable and picklable

    @classmethod
    def make(cls, kind: str, **params: Any) -> "ScorerSpec":
        return cls(kind, tuple(sorted(params.items())))

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def signature(self) -> str:
        """What a cached score depends on (batch size and device do not change scores)."""
        return repr((self.kind, [(k, v) for k, v in self.params if k not in ("batch_size", "device")]))


def _cached(key: tuple, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def load_lm(model: str, device: str = "cpu"):
    """(model, tokenizer) for any spec :func:`~mobilellm_r1.model.gguf.load_any` takes, once per process."""
    def make():
        from ..model.gguf import load_any
        from ..tokenizer import load_tokenizer

        m, meta = load_any(model, device=device)
        if not meta.get("tokenizer"):
            raise ValueError(f"scorer {model!r} has no known tokenizer")
        return m, load_tokenizer(meta["tokenizer"])

    return _cached(("lm", model, device), make)


def build_scorer(spec: ScorerSpec) -> Callable[[Sequence[str]], Rows]:
    device = spec.get("device", "cpu")
    if spec.kind == "askllm":
        from .askllm import AskLLM, transformer_last_logits

        model, tok = load_lm(spec.get("model"), device)
        scorer = AskLLM(transformer_last_logits(model, model.cfg.pad_id), tok,
                        max_doc_tokens=int(spec.get("max_doc_tokens")), context=model.cfg.max_seq_len,
                        batch_size=int(spec.get("batch_size", 8)), chat=spec.get("chat"))
        return lambda texts: scorer.score(texts, spec.get("question"), spec.get("answer", "yes_no"))
    if spec.kind == "embed":
        from .embed import Embedder

        emb = _cached(("embed", spec.get("embedder"), device),
                      lambda: Embedder(spec.get("embedder"), device, int(spec.get("batch_size", 32))))
        return lambda texts: [{"embedding": e} for e in emb.encode(texts).tolist()]
    if spec.kind == "fineweb":
        from .quality import FineWebEduScorer

        clf = _cached(("fineweb", spec.get("path"), device),
                      lambda: FineWebEduScorer(spec.get("path"), device, int(spec.get("batch_size", 16))))
        return clf.score
    raise ValueError(f"unknown scorer kind {spec.kind!r}")


def _score_shard(spec: ScorerSpec, texts: list[str]) -> Rows:
    return build_scorer(spec)(texts)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class LocalExecutor:
    """Scores texts in shards on ``workers`` processes (1: in this process), results in input order.

    Use as a context manager so the pool (and the models its workers loaded) lives across steps."""

    def __init__(self, workers: int = 1, shard_size: int = 16, progress: bool = True):
        self.workers = max(1, workers)
        self.shard_size = max(1, shard_size)
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "LocalExecutor":
        if self.workers > 1:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(threads,))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, spec: ScorerSpec, texts: Sequence[str], desc: str = "score") -> tuple[Rows, float]:
        """(rows, seconds spent). A progress bar shows samples/s."""
        texts = list(texts)
        if not texts:
            return [], 0.0
        shards = [texts[i: i + self.shard_size] for i in range(0, len(texts), self.shard_size)]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), desc=desc, unit="sample", dynamic_ncols=True, leave=False)
        t0 = time.perf_counter()
        out: Rows = []
        try:
            if self._pool is None:
                scorer = build_scorer(spec)
                t0 = time.perf_counter()  # the model load is not scoring time
                results: Iterable[Rows] = (scorer(s) for s in shards)
            else:
                results = self._pool.map(_score_shard, [spec] * len(shards), shards)
            for rows in results:
                out.extend(rows)
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
        return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- datatrove

try:
    from datatrove.pipeline.base import PipelineStep as _PipelineStep
except ImportError:  # datatrove is optional: the local executor needs nothing from it
    _PipelineStep = object


class ScoreStep(_PipelineStep):
    """A datatrove pipeline step that adds one curation score to each document's metadata
    (``metadata[key]`` = the score; the rest of the scorer's row under ``metadata[key + "_info"]``), and
    optionally drops documents at or below ``min_score``. Runs under any datatrove executor."""

    name = "curation score"
    type = "Filters"

    def __init__(self, spec: ScorerSpec, key: str, batch_size: int = 16, min_score: float | None = None):
        if _PipelineStep is object:
            raise ImportError("ScoreStep needs datatrove: pip install datatrove")
        super().__init__()
        self.spec, self.key, self.batch_size, self.min_score = spec, key, batch_size, min_score

    def run(self, data, rank: int = 0, world_size: int = 1):
        scorer = build_scorer(self.spec)
        batch = []

        def flush():
            rows = scorer([d.text for d in batch])
            for d, r in zip(batch, rows):
                r = dict(r)
                d.metadata[self.key] = r.pop("score")
                d.metadata[self.key + "_info"] = r
                self.stat_update("scored")
                if self.min_score is not None and d.metadata[self.key] <= self.min_score:
                    self.stat_update("dropped")
                    continue
                yield d

        for doc in data:
            batch.append(doc)
            if len(batch) == self.batch_size:
                yield from flush()
                batch = []
        if batch:
            yield from flush()
