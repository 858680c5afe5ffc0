"""Semantic dedup (paper section 5.1.1, Figure 5, step 4), SemDeDup-style: cluster the embeddings with
k-means, then inside each cluster walk the samples in input order and drop every sample whose cosine
similarity to an earlier *kept* sample exceeds the threshold. Everything is deterministic: k-means++
seeding from a seeded generator, a fixed iteration count, ties resolved by index, first occurrence kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 20) -> torch.Tensor:
    """Cluster ids (N,) for rows of ``x`` under cosine geometry (rows are L2-normalised first)."""
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    k = max(1, min(k, n))
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    # k-means++ seeding: each new centre drawn with probability proportional to its distance to the nearest one.
    centres = [int(torch.randint(n, (1,), generator=g))]
    d = 1.0 - x @ x[centres[0]]
    for _ in range(1, k):
        p = d.clamp(min=0)
        if float(p.sum()) <= 0:
            break  # every point coincides with a centre
        c = int(torch.multinomial(p, 1, generator=g))
        centres.append(c)
        d = torch.minimum(d, 1.0 - x @ x[c])
    c = x[centres].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = (x @ c.T).argmax(dim=1)
        if _ > 0 and torch.equal(new, assign):
            break
        assign = new
        for j in range(c.shape[0]):
            members = x[assign == j]
            if len(members):
                c[j] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return assign


@dataclass
class DedupResult:
    keep: list[bool]
    cluster: list[int]
    dup_of: list[int]  # index of the kept sample a dropped one duplicates; -1 when kept
    max_sim: list[float]  # highest similarity to an earlier kept sample in the cluster (0 for the first)


def semantic_dedup(x: torch.Tensor, threshold: float, k: int, seed: int = 0) -> DedupResult:
    """Which rows of ``x`` (N, dim) to keep: a row is dropped when its cosine similarity to an earlier kept
    row of its cluster is above ``threshold``."""
    n = x.shape[0]
    cluster = kmeans(x, k, seed)
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    keep, dup_of, max_sim = [True] * n, [-1] * n, [0.0] * n
    for j in sorted(set(cluster.tolist())):
        idx = torch.nonzero(cluster == j).flatten().tolist()  # ascending: input order
        sims = xn[idx] @ xn[idx].T
        kept: list[int] = []
        for a, i in enumerate(idx):
            if kept:
                s = sims[a, kept]
                best = int(s.argmax())
                max_sim[i] = float(s[best])
                if max_sim[i] > threshold:
                    keep[i], dup_of[i] = False, idx[kept[best]]
                    continue
            kept.append(a)
    return DedupResult(keep=keep, cluster=cluster.tolist(), dup_of=dup_of, max_sim=max_sim)
