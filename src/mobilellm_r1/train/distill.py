"""``mobilellm-r1 distill cache``: precompute a teacher's top-k log-probs beside the token shards.

The cache mirrors how the mixture sampler cuts a source into chunks: the stream is split into windows of
``seq_len + 1`` tokens with stride ``seq_len`` (window c starts at token ``c * seq_len``), the teacher reads
each window's first ``seq_len`` tokens exactly as the student will (causal, document-masked if
``doc_mask``), and row ``t`` of the cache holds its top-k (ids, log-probs) for the token after ``t``. So the
KD loss from the cache equals the online one for every sampled row (exactly, when k = vocabulary).

Layout: ``OUT/meta.json`` and ``OUT/<source>/ids.npy``, ``logp.npy`` of shape ``(tokens, k)``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_json
from ..data.mixture import window_doc_ids
from ..data.shards import ShardSet


def write_cache(teacher_spec: str, shards_dir: str | Path, out: str | Path, top_k: int, seq_len: int,
                doc_mask: bool = False, batch: int = 8, sources: list[str] | None = None,
                logp_dtype: str = "float16", device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    from .loop import load_model_spec, same_tokenizer

    shards = ShardSet(shards_dir)
    teacher, meta = load_model_spec(teacher_spec, device=device, dtype=torch.float32)
    t_tok, d_tok = meta.get("tokenizer", ""), shards.index["tokenizer"]
    if not t_tok or not same_tokenizer(t_tok, d_tok):
        raise ValueError(f"teacher {teacher_spec!r} uses tokenizer {t_tok or 'unknown'!r}, the shards {d_tok!r}")
    vocab = teacher.cfg.vocab_size
    if not 0 < top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    id_dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    todo = sources or shards.sources
    t0, done = time.perf_counter(), 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(shards.n_tokens(s) for s in todo), unit="tok", unit_scale=True, desc="distill cache")
    for src in todo:
        n_tok = shards.n_tokens(src)
        n_chunks = (n_tok - 1) // seq_len
        d = out / src
        d.mkdir(exist_ok=True)
        tmp_ids, tmp_lp = d / ".ids.npy.tmp", d / ".logp.npy.tmp"
        ids_mm = np.lib.format.open_memmap(tmp_ids, mode="w+", dtype=id_dtype, shape=(n_tok, top_k))
        lp_mm = np.lib.format.open_memmap(tmp_lp, mode="w+", dtype=np.dtype(logp_dtype), shape=(n_tok, top_k))
        doc_starts = shards.doc_starts(src) if doc_mask else None
        for c0 in range(0, n_chunks, batch):
            cs = list(range(c0, min(c0 + batch, n_chunks)))
            toks = np.stack([shards.tokens(src, c * seq_len, seq_len) for c in cs]).astype(np.int64)
            doc = None
            if doc_mask:
                doc = np.stack([window_doc_ids(doc_starts, c * seq_len, seq_len, np.int64) for c in cs])
                doc = torch.from_numpy(doc).to(device)
            with torch.no_grad():
                logits = teacher(torch.from_numpy(toks).to(device), doc_ids=doc).float()
                logp = torch.log_softmax(logits, dim=-1)
                lp, ix = logp.topk(top_k, dim=-1)
            for j, c in enumerate(cs):
                ids_mm[c * seq_len:(c + 1) * seq_len] = ix[j].cpu().numpy().astype(id_dtype)
                lp_mm[c * seq_len:(c + 1) * seq_len] = lp[j].cpu().numpy().astype(logp_dtype)
            done += len(cs) * seq_len
            if bar is not None:
                bar.update(len(cs) * seq_len)
        ids_mm.flush()
        lp_mm.flush()
        del ids_mm, lp_mm
        tmp_ids.replace(d / "ids.npy")
        tmp_lp.replace(d / "logp.npy")
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t0
    meta_out = {"teacher": teacher_spec, "tokenizer": d_tok, "top_k": top_k, "seq_len": seq_len,
                "doc_mask": doc_mask, "logp_dtype": logp_dtype, "sources": todo, "shards": str(Path(shards_dir)),
                "tokens": done, "seconds": secs, "tokens_per_s": done / max(secs, 1e-9)}
    write_json(out / "meta.json", meta_out)
    return meta_out


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())
