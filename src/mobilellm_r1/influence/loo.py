"""Leave-one-out ablations (paper Eq. 1): Delta-L_{g,c} = L_c(trained without g) - L_c(trained on all).

Every run starts from the same initialisation and trains on the same number of steps with *equal
per-source sampling and no repeats* (``MixtureSampler.equal``; ``exclude`` drops the left-out source), so
the runs differ only in which sources they see. L_c is the mean next-token NLL (nats/token) on
capability c's probing set, tracked every ``loo_eval_every`` steps. Positive Delta-L: leaving g out hurts c.

The loop is a lean one (AdamW, the fused head loss, a constant lr) rather than ``train.loop.train_stage``:
at demo scale the per-run set-up, checkpointing and held-out passes of the full loop cost more than the
few dozen steps themselves.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Iterator

import torch

from ..train.objectives import head_loss, next_token_targets
from .features import pad_rows


def probe_nll(model, rows: list[list[int]], seq_len: int, batch: int = 8, pad_id: int = 0) -> float:
    """Mean NLL per target token (nats) of ``model`` on token rows."""
    tot, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            inp, tgt = pad_rows(rows[i:i + batch], seq_len, pad_id)
            h = model(inp, return_hidden=True)
            parts = head_loss(h, model.head_weight, tgt)
            tot += float(parts.ce_sum)
            n += int(parts.tokens)
    model.train()
    return tot / max(n, 1)


def lean_train(model, batches: Iterator[torch.Tensor], steps: int, lr: float, weight_decay: float = 0.1,
               on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """``steps`` AdamW steps on token rows ``(B, S+1)`` from ``batches`` (stops early when they run out)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    losses = []
    for step in range(steps):
        try:
            tokens = next(batches)
        except StopIteration:
            break
        inp, tgt = next_token_targets(tokens)
        parts = head_loss(model(inp, return_hidden=True), model.head_weight, tgt)
        loss = parts.loss / parts.tokens.clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return losses


def sampler_batches(sampler, batch: int) -> Iterator[torch.Tensor]:
    while True:
        try:
            b = sampler.next_batch(batch)
        except StopIteration:
            return
        yield torch.from_numpy(b.tokens)


def run_loo(model, shards, sources: list[str], probes: dict[str, list[list[int]]], *, steps: int, batch: int,
            seq_len: int, lr: float, eval_every: int, seed: int = 0, heldout_fraction: float = 0.0,
            progress: bool = False) -> dict[str, Any]:
    """The all-sources run plus one run per left-out source, from copies of ``model``. Returns curves
    (step -> L_c), final L_c per run, and Delta-L[g][c] (Eq. 1)."""
    from ..data.mixture import MixtureSampler

    runs: dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps * (len(sources) + 1), desc="loo", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    for left in [None] + list(sources):
        m = copy.deepcopy(model)
        samp = MixtureSampler.equal(shards, list(sources), seq_len, seed=seed, exclude=[left] if left else [],
                                    split="train" if heldout_fraction > 0 else "all", heldout_fraction=heldout_fraction)
        curve = {0: {c: probe_nll(m, r, seq_len) for c, r in probes.items()}}

        def on_step(step: int, loss: float) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(run=left or "all", loss=f"{loss:.3f}")
            if eval_every and step % eval_every == 0 and step < steps:
                curve[step] = {c: probe_nll(m, r, seq_len) for c, r in probes.items()}

        losses = lean_train(m, sampler_batches(samp, batch), steps, lr, on_step=on_step)
        curve[len(losses)] = {c: probe_nll(m, r, seq_len) for c, r in probes.items()}
        runs[left or "all"] = {"steps": len(losses), "train_loss": losses, "probe_nll": curve,
                               "final": curve[len(losses)]}
    if bar is not None:
        bar.close()
    base = runs["all"]["final"]
    delta = {g: {c: runs[g]["final"][c] - base[c] for c in probes} for g in sources}
    # normalised by the all-sources loss, so capabilities with different loss scales compare
    rel = {g: {c: delta[g][c] / base[c] for c in probes} for g in sources}
    return {"delta_l": delta, "delta_l_relative": rel, "runs": runs, "seconds": time.perf_counter() - t0,
            "steps": steps, "batch": batch, "seq_len": seq_len}
