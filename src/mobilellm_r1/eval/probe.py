"""Capability probing without benchmarks: NLL / perplexity of a model on token sets, and RankMe.

The paper ranks data sources by how a model trained on them does on small *capability-probing sets*
(code, math, knowledge): Eq. 1 uses the normalised negative log-likelihood per token on those sets, and
appendix B adds RankMe (Garrido et al., 2023; the paper's Eq. 9), the effective rank of a model's output
embeddings. This module measures both for any model this package loads:

- :func:`token_nll`: NLL on the token streams of a shard directory (``mobilellm-r1 data tokenize``). Each
  source's stream is cut like the mixture sampler cuts it: windows of ``seq_len + 1`` tokens with stride
  ``seq_len`` (window ``c`` starts at token ``c * seq_len``; the last partial window is dropped), so every
  token after the first is a target exactly once. ``max_tokens`` keeps ``max_tokens // seq_len`` windows
  evenly spaced over the stream (deterministic). With ``doc_mask`` attention stays inside documents and a
  document's first token is not a target of the previous one, exactly as in training. ``heldout_fraction``
  restricts scoring to the windows the sampler's ``split="heldout"`` reserves (text training never saw).
- :func:`text_nll`: NLL on raw documents (JSONL/Parquet/text files via :func:`read_text_sources`): each
  document is tokenized as BOS + text + EOS (the shards' layout) and scored on its own; a document longer
  than ``seq_len + 1`` tokens is split into windows (stride ``seq_len`` by default; a smaller ``stride``
  gives later windows overlapping context and scores only their new targets).
- :func:`rankme`, :func:`output_embeddings`, :func:`model_rankme`: Eq. 9 on the final-normed hidden states
  (``forward(..., return_hidden=True)``, the vectors the tied head turns into logits).
- :func:`probe` (``mobilellm-r1 probe``): both, per source and overall, in one forward pass per window,
  plus the RankMe of the (tied) embedding matrix itself.

NLL sums come from :func:`~mobilellm_r1.train.objectives.head_loss` (chunked, never the full logits) and are
accumulated in float64. ``bits_per_byte`` = total NLL / ln 2 / UTF-8 bytes of the scored target tokens,
where a token's bytes are read from the tokenizer (exact for byte-level BPE and tiktoken vocabularies;
special tokens count 0 bytes but their NLL is kept); it is ``None`` when the tokenizer cannot be loaded or
is not byte-level.

Which embeddings: the paper text available to this implementation does not pin down how hidden states are
pooled before RankMe, so ``pool`` offers three readings: ``"token"`` (default) samples ``n`` token positions
per source uniformly at random (seeded) among the scored positions, one embedding each; ``"last"`` takes the
last position of each window (shards) / document (texts); ``"mean"`` mean-pools each window / document.
RankMe is bounded by ``min(N, dim)``, so ``n`` should exceed the model width for a meaningful number.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..data.mixture import window_doc_ids

POOLS = ("token", "last", "mean")
DEFAULT_SEQ_LEN = 2048  # the default window when neither the caller nor a shorter model context sets one
_SVD_MAX_ELEMENTS = 1 << 24  # larger matrices take the Gram route in rankme()


# ---------------------------------------------------------------------------------------------- RankMe


def singular_values(x: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Singular values (descending, float64, CPU) of an ``(N, d)`` matrix.

    ``"svd"``: LAPACK on float64. ``"gram"``: eigenvalues of the ``min(N, d)``-square Gram matrix, built from
    float32 row chunks accumulated in float64 on the matrix's own device; it costs one pass over a tall
    matrix (a 128k-vocabulary embedding) and loses only singular values below ~1e-4 of the largest, which
    carry no weight in RankMe. ``"auto"``: SVD up to 16M elements, else Gram.
    """
    if x.ndim != 2:
        raise ValueError(f"expected an (N, d) matrix, got shape {tuple(x.shape)}")
    x = x.detach()
    if method == "auto":
        method = "svd" if x.numel() <= _SVD_MAX_ELEMENTS else "gram"
    if method == "svd":
        return torch.linalg.svdvals(x.cpu().to(torch.float64))
    if method != "gram":
        raise ValueError(f"method must be auto, svd or gram, not {method!r}")
    if x.shape[0] < x.shape[1]:
        x = x.t()
    d = x.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    step = max(1, (1 << 22) // max(d, 1))
    for i in range(0, x.shape[0], step):
        c = x[i:i + step].float()
        gram += (c.t() @ c).double()
    ev = torch.linalg.eigvalsh(gram.cpu()).clamp_(min=0).sqrt_()
    return ev.flip(0)


def rankme(embeddings: torch.Tensor, eps: float = 1e-7, method: str = "auto") -> float:
    """RankMe (Garrido et al., 2023) of an ``(N, d)`` embedding matrix: the exponential of the entropy of
    its normalised singular values, a smooth count of the directions the embeddings actually use.

    Eq. 9:  p_k = sigma_k / sum_j sigma_j + eps,   RankMe = exp(-sum_k p_k log p_k).

    Invariant to scaling; N orthonormal-ish rows of width r give r; a rank-1 matrix gives 1. An all-zero
    matrix gives 0."""
    s = singular_values(embeddings, method)
    total = s.sum()
    if not float(total) > 0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


# ------------------------------------------------------------------------------------- token bytes


@lru_cache(maxsize=8)
def _byte_table_for(spec: str) -> np.ndarray | None:
    try:
        from ..tokenizer import load_tokenizer

        return token_byte_lengths(load_tokenizer(spec))
    except Exception:  # a tokenizer that moved or cannot load: no bits per byte, not a failed probe
        return None


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """UTF-8 bytes each token id stands for (int64, length ``vocab_size``); special tokens 0. ``None`` for a
    tokenizer whose tokens are not byte sequences (not tiktoken, not byte-level BPE)."""
    enc = getattr(tokenizer, "_enc", None)
    table = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    if enc is not None and hasattr(enc, "decode_single_token_bytes"):  # tiktoken
        for i in range(enc.n_vocab):
            if i < len(table):
                try:
                    table[i] = len(enc.decode_single_token_bytes(i))
                except KeyError:
                    table[i] = 0
        for i in getattr(tokenizer, "_specials", {}).values():
            if i < len(table):
                table[i] = 0
        return table
    backend = getattr(tokenizer, "_tok", None)
    if backend is None:
        return None
    from tokenizers import decoders

    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    for tok, i in backend.get_vocab(with_added_tokens=True).items():
        if i < len(table) and i not in special:
            table[i] = len(tok)  # byte-level BPE: one character per byte (GPT-2's bytes_to_unicode)
    return table


# ------------------------------------------------------------------------------------------- rows


@dataclass
class _Row:
    """One window to run: ``tokens`` (≤ seq_len + 1); targets ``tokens[1:]`` from index ``first`` on are
    scored (earlier ones are context only). ``group`` = window (shards) or document (texts) number;
    ``last`` marks a group's final row."""

    tokens: np.ndarray
    doc_ids: np.ndarray | None
    first: int
    group: int
    last: bool = True

    @property
    def n_scored(self) -> int:
        return len(self.tokens) - 1 - self.first


def pick_windows(n_windows: int, seq_len: int, max_tokens: int = 0) -> tuple[np.ndarray, int]:
    """Which windows of a stream to score and from which target on: all of them without a cap; else
    ``max_tokens // seq_len`` windows evenly spaced over the stream; a cap below one window scores the last
    ``max_tokens`` targets of the first window. Returns (window indices, first scored target)."""
    if max_tokens <= 0 or max_tokens >= n_windows * seq_len:
        return np.arange(n_windows, dtype=np.int64), 0
    k = max_tokens // seq_len
    if k == 0:
        return np.zeros(1, dtype=np.int64), seq_len - max_tokens
    return (np.arange(k, dtype=np.int64) * n_windows) // k, 0


def _shard_rows(shards, source: str, seq_len: int, max_tokens: int, doc_mask: bool, heldout_fraction: float = 0.0
                ) -> tuple[list[int], Iterator[_Row]]:
    n_tok = shards.n_tokens(source)
    n_win = (n_tok - 1) // seq_len
    if n_win < 1:
        raise ValueError(f"source {source!r} has {n_tok} tokens: fewer than one window of seq_len + 1 = "
                         f"{seq_len + 1}; use a smaller seq_len")
    offset = 0
    if heldout_fraction > 0:  # the mixture sampler's split="heldout": the last ceil(h * n) windows
        held = -int(-heldout_fraction * n_win // 1)
        offset, n_win = n_win - held, held
    idx, first = pick_windows(n_win, seq_len, max_tokens)
    idx = idx + offset
    starts = shards.doc_starts(source) if doc_mask else None

    def gen() -> Iterator[_Row]:
        for g, c in enumerate(idx.tolist()):
            s = c * seq_len
            toks = np.asarray(shards.tokens(source, s, seq_len + 1), dtype=np.int64)
            doc = window_doc_ids(starts, s, seq_len + 1, np.int64) if doc_mask else None
            yield _Row(toks, doc, first, g)

    return [seq_len - first] * len(idx), gen()


def _text_rows(ids_per_doc: Sequence[Sequence[int]], seq_len: int, stride: int, max_tokens: int) -> list[_Row]:
    """Windows of each tokenized document, in document order; ``max_tokens`` stops after that many targets."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    rows: list[_Row] = []
    budget = max_tokens if max_tokens > 0 else None
    for g, ids in enumerate(ids_per_doc):
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        if n < 2:
            continue
        s, done = 0, 0  # done: targets (ids[1:]) of this document scored so far
        while True:
            e = min(s + seq_len + 1, n)
            row = _Row(ids[s:e], None, done - s, g, last=False)
            if budget is not None and row.n_scored >= budget:
                row.tokens = row.tokens[: row.first + budget + 1]
                budget = 0
            elif budget is not None:
                budget -= row.n_scored
            rows.append(row)
            done = s + len(row.tokens) - 1
            if e == n or budget == 0:
                break
            s += stride
        rows[-1].last = True
        if budget == 0:
            break
    return rows


# ------------------------------------------------------------------------------------------ engine


class _Embeds:
    """Collects the output embeddings a pooling rule asks for while the rows stream past."""

    def __init__(self, pool: str, n: int, counts: list[int], groups: int, seed: int):
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
        self.pool, self.seen = pool, 0
        self.vectors: dict[int, torch.Tensor] = {}
        if pool == "token":
            total = int(sum(counts))
            m = min(n, total)
            self.want = np.sort(np.random.default_rng(seed).choice(total, size=m, replace=False)) if m else \
                np.zeros(0, np.int64)
        else:
            m = min(n, groups)
            self.groups = set(((np.arange(m, dtype=np.int64) * groups) // m).tolist()) if m else set()
            self.sums: dict[int, torch.Tensor] = {}
            self.counts: dict[int, int] = {}

    def take(self, row: _Row, h: torch.Tensor) -> None:
        """``h``: ``(L, d)`` hidden states of the row's inputs (padding included)."""
        c = row.n_scored
        if self.pool == "token":
            lo, hi = np.searchsorted(self.want, [self.seen, self.seen + c])
            if hi > lo:
                pos = torch.as_tensor(self.want[lo:hi] - self.seen + row.first, device=h.device)
                for j, v in zip(range(lo, hi), h[pos].float().cpu()):
                    self.vectors[int(j)] = v
            self.seen += c
            return
        if row.group not in self.groups or c <= 0:
            return
        if self.pool == "last":
            if row.last:
                self.vectors[row.group] = h[len(row.tokens) - 2].float().cpu()
            return
        part = h[row.first:len(row.tokens) - 1].double().sum(0).cpu()
        self.sums[row.group] = self.sums.get(row.group, 0) + part
        self.counts[row.group] = self.counts.get(row.group, 0) + c
        if row.last:
            self.vectors[row.group] = (self.sums.pop(row.group) / self.counts.pop(row.group)).float()

    def matrix(self, dim: int) -> torch.Tensor:
        if not self.vectors:
            return torch.zeros(0, dim)
        return torch.stack([self.vectors[k] for k in sorted(self.vectors)])


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _run_rows(model, rows: Iterable[_Row], n_rows: int, *, batch_size: int, score: bool = True,
              byte_table: np.ndarray | None = None, embeds: _Embeds | None = None, device=None,
              desc: str = "", progress: bool = False) -> dict[str, Any]:
    """Forward every row (batched, right-padded), summing NLL over scored targets and feeding ``embeds``."""
    from ..train.objectives import IGNORE, head_loss, next_token_targets

    device = torch.device(device) if device is not None else _model_device(model)
    weight = model.head_weight
    # The fused chunked head loss needs a plain weight; a torchao-quantized head is a tensor subclass.
    dense = type(weight.data if isinstance(weight, torch.nn.Parameter) else weight) is torch.Tensor
    table = torch.as_tensor(byte_table, device=device) if byte_table is not None else None
    nll, tokens, nbytes = 0.0, 0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_rows, unit="win", desc=desc or "probe", leave=False)

    def flush(batch: list[_Row]) -> None:
        nonlocal nll, tokens, nbytes
        width = max(len(r.tokens) for r in batch)
        toks = np.zeros((len(batch), width), dtype=np.int64)
        keep = np.zeros((len(batch), width - 1), dtype=bool)
        docs = np.zeros((len(batch), width), dtype=np.int64) if batch[0].doc_ids is not None else None
        for i, r in enumerate(batch):
            toks[i, :len(r.tokens)] = r.tokens
            keep[i, r.first:len(r.tokens) - 1] = True
            if docs is not None:
                docs[i, :len(r.tokens)] = r.doc_ids
                docs[i, len(r.tokens):] = r.doc_ids[-1] + 1  # padding: a document of its own
        x = torch.from_numpy(toks).to(device)
        doc = torch.from_numpy(docs).to(device) if docs is not None else None
        inputs, targets = next_token_targets(x, doc)
        targets[~torch.from_numpy(keep).to(device)] = IGNORE
        h = model(inputs, doc_ids=doc[:, :-1] if doc is not None else None, return_hidden=True)
        if score:
            if dense:
                parts = head_loss(h, weight, targets)
                ce_sum, n_tok = parts.ce_sum, parts.tokens
            else:  # a quantized head (deploy/quantize.py): only its module knows how to multiply
                logits = model.logits(h).float()
                ce_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                           ignore_index=IGNORE, reduction="sum")
                n_tok = (targets != IGNORE).sum()
            nll += float(ce_sum.double())
            tokens += int(n_tok)
            if table is not None:
                kept = targets[targets != IGNORE]
                nbytes += int(table[kept].sum())
        if embeds is not None:
            for i, r in enumerate(batch):
                embeds.take(r, h[i])
        if bar is not None:
            bar.update(len(batch))

    with torch.no_grad():
        batch: list[_Row] = []
        for row in rows:
            if row.n_scored <= 0:
                continue
            batch.append(row)
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    if bar is not None:
        bar.close()
    return {"nll_sum": nll, "tokens": tokens, "bytes": nbytes if table is not None else None}


def _summary(nll_sum: float, tokens: int, nbytes: int | None, **extra) -> dict[str, Any]:
    mean = nll_sum / tokens if tokens else float("nan")
    out: dict[str, Any] = {"nll": mean, "ppl": math.exp(mean) if tokens and mean < 700 else float("inf"),
                           "tokens": tokens}
    out["bytes"] = nbytes
    out["bits_per_byte"] = nll_sum / math.log(2) / nbytes if nbytes else None
    out.update(extra)
    return out


def _overall(per: dict[str, dict[str, Any]], sums: dict[str, float]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in per.values())
    total = sum(sums.values())
    nbytes = None if any(r["bytes"] is None for r in per.values()) else sum(r["bytes"] for r in per.values())
    return _summary(total, tokens, nbytes)


# ------------------------------------------------------------------------------------------ checks


def resolve_seq_len(model, seq_len: int | None) -> int:
    limit = model.cfg.max_seq_len
    if seq_len is None or seq_len == 0:
        return min(limit, DEFAULT_SEQ_LEN)
    if seq_len < 1:
        raise ValueError(f"seq_len must be ≥ 1, got {seq_len}")
    if seq_len > limit:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {limit}")
    return int(seq_len)


def _open_shards(shards):
    from ..data.shards import ShardSet

    return shards if isinstance(shards, ShardSet) else ShardSet(shards)


def _check_sources(wanted: Sequence[str] | None, known: Sequence[str], where: str) -> list[str]:
    if not wanted:
        return list(known)
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ValueError(f"unknown source{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"in {where}; known: {', '.join(known) or '(none)'}")
    return list(dict.fromkeys(wanted))


def _check_vocab(model, vocab: int, what: str) -> None:
    if vocab > model.cfg.vocab_size:
        raise ValueError(f"{what} has a vocabulary of {vocab:,} ids, larger than the model's "
                         f"{model.cfg.vocab_size:,}: they were made with a different tokenizer")


# ------------------------------------------------------------------------------------------- NLL


def _shards_pass(model, shards, sources, seq_len, max_tokens, batch_size, doc_mask, device, *,
                 score=True, bits_per_byte=True, rankme_samples=0, pool="token", seed=0, progress=False,
                 heldout_fraction=0.0):
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), not {heldout_fraction}")
    ss = _open_shards(shards)
    seq_len = resolve_seq_len(model, seq_len)
    names = _check_sources(sources, ss.sources, str(ss.root))
    _check_vocab(model, int(ss.index["vocab_size"]), f"the shards at {ss.root} (tokenizer {ss.index['tokenizer']!r})")
    table = _byte_table_for(ss.index["tokenizer"]) if score and bits_per_byte else None
    if table is not None and len(table) != int(ss.index["vocab_size"]):
        table = None
    per, sums, emb = {}, {}, {}
    for src in names:
        counts, rows = _shard_rows(ss, src, seq_len, max_tokens, doc_mask, heldout_fraction)
        e = _Embeds(pool, rankme_samples, counts, len(counts), seed) if rankme_samples > 0 else None
        res = _run_rows(model, rows, len(counts), batch_size=batch_size, score=score, byte_table=table,
                        embeds=e, device=device, desc=src, progress=progress)
        sums[src] = res["nll_sum"]
        per[src] = _summary(res["nll_sum"], res["tokens"], res["bytes"], windows=len(counts))
        if e is not None:
            emb[src] = e.matrix(model.cfg.dim)
    return seq_len, per, sums, emb


def token_nll(model, shards, sources: Sequence[str] | None = None, seq_len: int | None = None,
              max_tokens: int = 0, batch_size: int = 8, doc_mask: bool = False, device=None,
              bits_per_byte: bool = True, heldout_fraction: float = 0.0, progress: bool = False) -> dict[str, Any]:
    """NLL of ``model`` on each source of a shard directory (or :class:`~mobilellm_r1.data.shards.ShardSet`).

    Returns ``{"sources": {name: {"nll" (mean nats/token), "ppl", "tokens", "windows", "bytes",
    "bits_per_byte"}}, "overall": {...token-weighted...}, "seq_len", "doc_mask", "max_tokens"}``.
    ``seq_len`` defaults to ``min(model max_seq_len, 2048)``; ``max_tokens`` caps target tokens per source
    (evenly spaced windows); ``heldout_fraction`` h > 0 scores only the windows a
    :class:`~mobilellm_r1.data.mixture.MixtureSampler` with ``split="heldout"`` and the same ``seq_len`` and h
    draws (the last ``ceil(h * n)`` of each source), i.e. text a training run never saw; ``device`` defaults to
    the model's."""
    seq_len, per, sums, _ = _shards_pass(model, shards, sources, seq_len, max_tokens, batch_size, doc_mask,
                                         device, bits_per_byte=bits_per_byte, progress=progress,
                                         heldout_fraction=heldout_fraction)
    return {"sources": per, "overall": _overall(per, sums), "seq_len": seq_len, "doc_mask": doc_mask,
            "max_tokens": max_tokens}


def _load_tok(tokenizer):
    if isinstance(tokenizer, str):
        from ..tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def _text_pass(model, tok, texts, seq_len, stride, max_tokens, batch_size, eos, device, *, score=True,
               bits_per_byte=True, rankme_samples=0, pool="token", seed=0, progress=False, desc="texts"):
    seq_len = resolve_seq_len(model, seq_len)
    _check_vocab(model, tok.vocab_size, f"tokenizer {tok.spec!r}")
    ids = tok.encode_batch(list(texts), bos=True, eos=eos)
    rows = _text_rows(ids, seq_len, stride or seq_len, max_tokens)
    counts = [r.n_scored for r in rows]
    n_docs = len({r.group for r in rows})
    # longest first, so each batch pads little; order is deterministic
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].tokens), i))
    rows = [rows[i] for i in order]
    counts = [counts[i] for i in order]
    groups = max((r.group for r in rows), default=-1) + 1
    e = _Embeds(pool, rankme_samples, counts, groups, seed) if rankme_samples > 0 else None
    table = token_byte_lengths(tok) if score and bits_per_byte else None
    res = _run_rows(model, rows, len(rows), batch_size=batch_size, score=score, byte_table=table, embeds=e,
                    device=device, desc=desc, progress=progress)
    summary = _summary(res["nll_sum"], res["tokens"], res["bytes"], docs=n_docs, windows=len(rows))
    return seq_len, summary, res["nll_sum"], (e.matrix(model.cfg.dim) if e is not None else None)


def text_nll(model, tokenizer, texts: Sequence[str], seq_len: int | None = None, stride: int | None = None,
             max_tokens: int = 0, batch_size: int = 8, eos: bool = True, device=None,
             bits_per_byte: bool = True, progress: bool = False) -> dict[str, Any]:
    """NLL of ``model`` on raw documents: each is tokenized as BOS + text (+ EOS) and scored on its own, in
    windows of ``seq_len + 1`` tokens when longer (``stride`` ≤ seq_len; the default seq_len gives disjoint
    windows). ``max_tokens`` stops after that many scored targets (documents in order). ``tokenizer``: a
    :class:`~mobilellm_r1.tokenizer.Tokenizer` or a spec. Returns ``{"nll", "ppl", "tokens", "docs",
    "windows", "bytes", "bits_per_byte", "seq_len"}``."""
    tok = _load_tok(tokenizer)
    seq_len, summary, _, _ = _text_pass(model, tok, texts, seq_len, stride, max_tokens, batch_size, eos, device,
                                        bits_per_byte=bits_per_byte, progress=progress)
    summary["seq_len"] = seq_len
    return summary


def read_text_sources(paths: Sequence[str | Path], text_field: str = "text") -> dict[str, list[str]]:
    """Documents of JSONL / Parquet / text inputs (files or folders), grouped into sources named as
    ``mobilellm-r1 data tokenize`` names them (the file stem or folder name)."""
    from ..data.sources import ReadStats, group_inputs, iter_documents

    out: dict[str, list[str]] = {}
    for name, inputs in group_inputs(paths).items():
        stats = ReadStats()
        docs = [d.text for p in inputs for d in iter_documents(p, text_field, name, stats)]
        if not docs:
            raise ValueError(f"source {name!r} ({', '.join(inputs)}): no documents with a {text_field!r} field "
                             f"({stats.skipped} records skipped)")
        out[name] = docs
    return out


# ------------------------------------------------------------------------------------- embeddings


def output_embeddings(model, data, n: int = 1024, *, tokenizer=None, sources: Sequence[str] | None = None,
                      pool: str = "token", seq_len: int | None = None, max_tokens: int = 0, batch_size: int = 8,
                      doc_mask: bool = False, seed: int = 0, heldout_fraction: float = 0.0, device=None
                      ) -> torch.Tensor:
    """Final-normed hidden states ``(N, dim)`` (float32, CPU): up to ``n`` per source of a shard directory /
    ShardSet ``data`` (the sources concatenated in order), or up to ``n`` from a list of documents (then
    ``tokenizer`` is required). ``pool``: ``"token"`` (``n`` positions sampled with ``seed`` among the
    scored positions), ``"last"`` (last position of each window / document) or ``"mean"`` (mean over each
    window / document); with more windows / documents than ``n``, ``n`` evenly spaced ones. The positions
    come from the same windows :func:`token_nll` / :func:`text_nll` score with the same arguments."""
    if isinstance(data, (list, tuple)) and (not data or isinstance(data[0], str)) and tokenizer is not None:
        _, _, _, m = _text_pass(model, _load_tok(tokenizer), data, seq_len, None, max_tokens, batch_size, True,
                                device, score=False, rankme_samples=n, pool=pool, seed=seed)
        return m
    if isinstance(data, (list, tuple)):
        raise ValueError("output_embeddings on documents needs a tokenizer")
    _, _, _, emb = _shards_pass(model, data, sources, seq_len, max_tokens, batch_size, doc_mask, device,
                                score=False, rankme_samples=n, pool=pool, seed=seed,
                                heldout_fraction=heldout_fraction)
    return torch.cat(list(emb.values())) if emb else torch.zeros(0, model.cfg.dim)


def model_rankme(model, data, n: int = 1024, **kw) -> dict[str, Any]:
    """RankMe (Eq. 9) of :func:`output_embeddings` (same arguments): ``{"rankme", "n", "dim", "pool"}``."""
    m = output_embeddings(model, data, n, **kw)
    return {"rankme": rankme(m) if len(m) else None, "n": int(m.shape[0]), "dim": int(m.shape[1]),
            "pool": kw.get("pool", "token")}


def embedding_rankme(model) -> dict[str, Any]:
    """RankMe of the token-embedding matrix ``(vocab, dim)`` (the tied head), and of the head when untied."""
    w = model.embed_tokens.weight
    out = {"rankme": rankme(w), "n": int(w.shape[0]), "dim": int(w.shape[1]), "tied": model.lm_head is None}
    if model.lm_head is not None:
        out["head_rankme"] = rankme(model.lm_head.weight)
    return out


# ------------------------------------------------------------------------------------------- probe


def _torch_dtype(name: str | None, device: str):
    if name in (None, "", "keep"):
        return None
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in names:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {name!r}")
    return names[name]


def _device_name(name: str | None) -> str:
    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no GPU")
    return str(name)


def probe(model_spec, shards: str | Path | None = None, texts: Sequence[str | Path] | None = None,
          sources: Sequence[str] | None = None, seq_len: int | None = None, max_tokens: int = 0,
          rankme_samples: int = 1024, pool: str = "token", doc_mask: bool = False, batch_size: int = 8,
          device: str = "auto", dtype: str = "auto", seed: int = 0, tokenizer: str | None = None,
          text_field: str = "text", stride: int | None = None, heldout_fraction: float = 0.0,
          embedding_rank: bool = True, check_tokenizer: bool = True, progress: bool = False) -> dict[str, Any]:
    """The capability probe: per-source NLL / perplexity / bits per byte and RankMe of the output embeddings
    on ``shards`` (a shard directory) and / or ``texts`` (data files, each file or folder a source), plus
    overall token-weighted NLL, RankMe over all sources' embeddings together, and the embedding matrix's
    RankMe. ``model_spec``: anything :func:`~mobilellm_r1.train.loop.load_model_spec` loads, or a loaded
    :class:`~mobilellm_r1.model.transformer.Transformer`. Returns a JSON-ready dict.

    Errors (``ValueError``): no data, an unknown source (naming the known ones), ``seq_len`` beyond the
    model's context, shards / a tokenizer with a larger vocabulary than the model, or (``check_tokenizer``)
    shards made with a different tokenizer than the model's."""
    from ..model.transformer import Transformer

    if shards is None and not texts:
        raise ValueError("nothing to probe: give shards and/or texts")
    if rankme_samples < 0 or max_tokens < 0:
        raise ValueError("rankme_samples and max_tokens must be ≥ 0")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    t0 = time.perf_counter()
    ss = None
    shard_names: list[str] = []
    if shards is not None:
        ss = _open_shards(shards)
        shard_names = ss.sources
    text_docs = read_text_sources(texts, text_field) if texts else {}
    clash = sorted(set(shard_names) & set(text_docs))
    if clash:
        raise ValueError(f"source name{'s' if len(clash) > 1 else ''} {', '.join(clash)} appear in both the shards "
                         "and the texts")
    known = shard_names + list(text_docs)
    names = _check_sources(sources, known, " and ".join(
        ([str(ss.root)] if ss is not None else []) + (["the texts"] if text_docs else [])))
    from_shards = [s for s in names if s in shard_names]
    from_texts = [s for s in names if s in text_docs]

    # the data is checked first (cheap), then the model is loaded
    dev = _device_name(device)
    if isinstance(model_spec, Transformer):
        model, model_tok, spec_name = model_spec, tokenizer or "", "<in-memory model>"
        dev = str(_model_device(model))
    else:
        from ..train.loop import load_model_spec

        model, meta = load_model_spec(str(model_spec), device=dev, dtype=_torch_dtype(dtype, dev))
        model_tok, spec_name = tokenizer or meta.get("tokenizer") or "", str(model_spec)
    seq_len = resolve_seq_len(model, seq_len)

    if from_shards:
        d_tok = ss.index["tokenizer"]
        _check_vocab(model, int(ss.index["vocab_size"]), f"the shards at {ss.root} (tokenizer {d_tok!r})")
        if check_tokenizer and model_tok:
            from ..train.loop import same_tokenizer

            if not same_tokenizer(model_tok, d_tok):
                raise ValueError(f"model {spec_name!r} uses tokenizer {model_tok!r}, the shards at {ss.root} {d_tok!r}")
    if from_texts and not model_tok:
        raise ValueError(f"model {spec_name!r} names no tokenizer: pass one to score texts")

    per: dict[str, dict[str, Any]] = {}
    sums: dict[str, float] = {}
    emb: dict[str, torch.Tensor] = {}
    if from_shards:
        _, p, s, e = _shards_pass(model, ss, from_shards, seq_len, max_tokens, batch_size, doc_mask, None,
                                  rankme_samples=rankme_samples, pool=pool, seed=seed, progress=progress,
                                  heldout_fraction=heldout_fraction)
        per.update(p)
        sums.update(s)
        emb.update(e)
    if from_texts:
        tok = _load_tok(model_tok)
        for src in from_texts:
            _, summary, s, m = _text_pass(model, tok, text_docs[src], seq_len, stride, max_tokens, batch_size, True,
                                          None, rankme_samples=rankme_samples, pool=pool, seed=seed,
                                          progress=progress, desc=src)
            per[src], sums[src] = summary, s
            if m is not None:
                emb[src] = m
    for src, m in emb.items():
        per[src]["rankme"] = rankme(m) if len(m) else None
        per[src]["rankme_n"] = int(m.shape[0])
    all_emb = torch.cat(list(emb.values())) if emb else torch.zeros(0, model.cfg.dim)
    secs = time.perf_counter() - t0
    overall = _overall(per, sums)
    return {
        "model": spec_name, "tokenizer": model_tok, "device": dev, "seq_len": seq_len, "doc_mask": doc_mask,
        "max_tokens": max_tokens, "heldout_fraction": heldout_fraction, "sources": per, "overall": overall,
        "rankme": {"rankme": rankme(all_emb) if len(all_emb) else None, "n": int(all_emb.shape[0]),
                   "dim": int(model.cfg.dim), "pool": pool, "samples_per_source": rankme_samples, "seed": seed},
        "embedding_rankme": embedding_rankme(model) if embedding_rank else None,
        "seconds": secs, "tokens_per_s": overall["tokens"] / max(secs, 1e-9),
    }


# --------------------------------------------------------------------------------------------- CLI


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def cmd_probe(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json

    srcs = [s for s in (args.sources or "").split(",") if s] or None
    if not args.shards and not args.texts:
        raise UserError("give --shards DIR and/or --texts FILE...")
    try:
        res = probe(args.model, shards=args.shards, texts=args.texts, sources=srcs, seq_len=args.seq_len or None,
                    max_tokens=args.max_tokens, rankme_samples=args.rankme_samples, pool=args.pool,
                    doc_mask=args.doc_mask, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                    seed=args.seed, tokenizer=args.tokenizer or None, text_field=args.text_field,
                    heldout_fraction=args.heldout_fraction, progress=not args.json)
    except (ValueError, KeyError) as e:  # CheckpointError is a ValueError
        raise UserError(str(e).strip("'\"")) from None
    if args.json:
        print_json(res)
        return 0
    print(f"{res['model']}: seq_len {res['seq_len']}{', document-masked' if res['doc_mask'] else ''}")
    print(f"{'source':<24} {'tokens':>10} {'nll':>8} {'ppl':>10} {'bpb':>7} {'rankme':>8}")
    for name, r in list(res["sources"].items()) + [("(overall)", {**res["overall"],
                                                                  "rankme": res["rankme"]["rankme"]})]:
        print(f"{name:<24} {r['tokens']:>10,} {_fmt(r['nll']):>8} {_fmt(r['ppl'], '.2f'):>10} "
              f"{_fmt(r.get('bits_per_byte'), '.3f'):>7} {_fmt(r.get('rankme'), '.1f'):>8}")
    rk = res["rankme"]
    print(f"RankMe of output embeddings: {_fmt(rk['rankme'], '.2f')} (N={rk['n']}, dim={rk['dim']}, pool={rk['pool']})")
    if res["embedding_rankme"]:
        er = res["embedding_rankme"]
        print(f"RankMe of the embedding matrix: {er['rankme']:.2f} ({er['n']:,} x {er['dim']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="capability probe: NLL / perplexity per source and RankMe (paper Eq. 1, 9)")
    p.add_argument("--model", required=True, help="our checkpoint dir, HF Llama4 dir, .gguf, or 'smollm2'")
    p.add_argument("--shards", help="token shards folder (mobilellm-r1 data tokenize)")
    p.add_argument("--texts", nargs="+", help="JSONL / Parquet / text files or folders; each is a source")
    p.add_argument("--sources", default="", help="comma-separated sources to probe (default: all)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: min(model context, 2048))")
    p.add_argument("--max-tokens", type=int, default=0, help="cap on scored tokens per source (0 = all)")
    p.add_argument("--rankme-samples", type=int, default=1024, help="output embeddings per source for RankMe")
    p.add_argument("--pool", choices=POOLS, default="token", help="which hidden states RankMe uses")
    p.add_argument("--doc-mask", action="store_true", help="document-masked attention, as in training")
    p.add_argument("--heldout-fraction", type=float, default=0.0,
                   help="score only the held-out tail a training sampler with this fraction never draws")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", help="tokenizer for --texts when the model names none")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_probe)
