"""Data-model co-evolution in mid-training (paper Eq. 7-8).

Phase p: score a fresh pool of raw mid-training windows with the *current* model (I_joint, Eq. 2-4 at one
checkpoint), keep those with I_joint > 0 (Eq. 7), re-weight the sources by Eq. 6 over the retained
samples (Eq. 8), train the next phase on the retained set with those weights, and repeat until the share
of positive-influence samples falls below ``coevolve_threshold`` or ``coevolve_max_phases`` is reached.
Writes, per phase, the retained-set indices (source, window start) and a histogram of I_joint (the data of
the paper's Figure 8).

Scoring here is TracIn (identity preconditioner) or DataInf: the phases' lean optimizer state is not kept,
so an ``adam`` setting falls back to the identity for co-evolution (recorded in the output).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import torch

from .loo import lean_train
from .mixing import weights_from_rho, source_rho
from .scores import InfluenceConfig, joint, score_model, shard_samples


def _retained_batches(samples, weights: dict[str, float], batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Rows of the retained samples, sources drawn by weight, samples uniformly within a source."""
    rng = np.random.default_rng(seed)
    by_src: dict[str, list] = {}
    for s in samples:
        by_src.setdefault(s.source, []).append(s)
    names = [n for n in weights if n in by_src]
    p = np.array([weights[n] for n in names], dtype=np.float64)
    p /= p.sum()
    while True:
        rows = []
        for _ in range(batch):
            src = by_src[names[rng.choice(len(names), p=p)]]
            rows.append(src[rng.integers(len(src))].ids)
        n = min(len(r) for r in rows)
        yield torch.tensor([r[:n] for r in rows], dtype=torch.long)


def coevolve(model, shards, sources: list[str], probes: dict[str, list[list[int]]], cfg: InfluenceConfig,
             progress: bool = False) -> dict[str, Any]:
    import dataclasses

    phases = []
    t0 = time.perf_counter()
    if cfg.preconditioner == "adam":
        cfg = dataclasses.replace(cfg, preconditioner="identity")
    caps = list(probes)
    for phase in range(cfg.coevolve_max_phases):
        pool = shard_samples(shards, sources, cfg.coevolve_pool, cfg.seq_len, seed=cfg.seed + 1000 * (phase + 1))
        s = score_model(model, pool, probes, cfg, lr=1.0)
        j = joint(s, caps, cfg)
        keep = j > 0
        share = float(keep.mean()) if len(j) else 0.0
        lo, hi = float(j.min()), float(j.max())
        counts, edges = np.histogram(j, bins=20, range=(lo, hi if hi > lo else lo + 1e-12))
        retained = [pool[i] for i in np.flatnonzero(keep)]
        rec: dict[str, Any] = {
            "phase": phase, "pool": len(pool), "positive_share": share,
            "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
            "joint": j.tolist(),
            "retained": [[r.source, r.index] for r in retained],
            "positive_share_by_source": {g: float(np.mean([keep[i] for i, x in enumerate(pool) if x.source == g]))
                                         for g in sources},
        }
        if share < cfg.coevolve_threshold or not retained:
            rec["stopped"] = f"positive share {share:.3f} < threshold {cfg.coevolve_threshold}"
            phases.append(rec)
            break
        rows = [{"source": r.source, "tokens": r.tokens, "joint": float(j[i])}
                for i, r in zip(np.flatnonzero(keep), retained)]
        w, clamped = weights_from_rho(source_rho(rows), cfg.floor)
        rec["weights"] = w
        rec["train_loss"] = lean_train(model, _retained_batches(retained, w, cfg.loo_batch, cfg.seed + phase),
                                       cfg.coevolve_steps, cfg.coevolve_lr)
        phases.append(rec)
        if progress:
            print(f"coevolve phase {phase}: positive share {share:.3f}, retained {len(retained)}/{len(pool)}, "
                  f"weights {', '.join(f'{k}={v:.2f}' for k, v in w.items())}", flush=True)
    return {"phases": phases, "seconds": time.perf_counter() - t0, "preconditioner": cfg.preconditioner,
            "final_positive_share": phases[-1]["positive_share"] if phases else None}
