"""PNG plots for the run report (matplotlib, headless Agg backend). Each returns the file or None when there
is nothing to plot, so a report of a partial run still renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{"loss": [(step, v)], "heldout_loss": [...], ...}`` from a stage's ``metrics.jsonl``."""
    out: dict[str, list[tuple[int, float]]] = {}
    p = Path(path) if path else None
    if p is None or not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest of the curve is still good
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        for key in ("loss", "heldout_loss", "reward_mean", "completion_len_mean"):
            v = rec.get(key)
            if isinstance(v, (int, float)):
                out.setdefault(key, []).append((step, float(v)))
    return out


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_losses(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path | None:
    """One panel per stage: training and held-out loss against the stage's steps. A GRPO stage has no loss
    worth plotting (its surrogate is 0 whenever a group's rewards agree), so its panel shows the paper's
    Figure 10 curves instead: mean reward, and mean completion length on a second axis."""
    curves = {n: c for n, c in curves.items() if c}
    if not curves:
        return None
    n = len(curves)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax, (name, c) in zip(axes.flat, curves.items()):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if "reward_mean" in c:
            xs, ys = zip(*c["reward_mean"])
            lines = ax.plot(xs, ys, "o-", color="C2", markersize=4, label="mean reward")
            ax.set_ylabel("reward")
            ax.set_ylim(min(-0.05, min(ys) - 0.05), max(1.05, max(ys) + 0.05))
            if "completion_len_mean" in c:
                twin = ax.twinx()
                xs, ys = zip(*c["completion_len_mean"])
                lines += twin.plot(xs, ys, "s--", color="C4", markersize=4, label="mean completion length")
                twin.set_ylabel("tokens")
            ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="center right")
            continue
        for key, style in (("loss", "-"), ("heldout_loss", "o--")):
            if key in c:
                xs, ys = zip(*c[key])
                ax.plot(xs, ys, style, label=key.replace("_", " "), markersize=4)
        ax.set_ylabel("nats / token")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Training curves per stage (mid-training's training loss is the KD objective; GRPO: reward)")
    return _save(fig, path)


def plot_mixtures(mixtures: dict[str, dict[str, float]], path: Path) -> Path | None:
    """Grouped bars: one group per source, one bar per mixture (uniform, influence, each stage)."""
    mixtures = {k: v for k, v in mixtures.items() if v}
    if not mixtures:
        return None
    sources = sorted({s for m in mixtures.values() for s in m})
    width = 0.8 / len(mixtures)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(sources)) + 2, 3.6), layout="constrained")
    for i, (name, m) in enumerate(mixtures.items()):
        total = sum(m.values()) or 1.0
        ax.bar([j + i * width for j in range(len(sources))], [m.get(s, 0.0) / total for s in sources],
               width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sources))], sources, rotation=30, ha="right")
    ax.set_ylabel("sampling weight")
    ax.set_title("Source mixture weights")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach the top
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_loo(curves: dict[str, dict[str, list[list[float]]]], path: Path) -> Path | None:
    """Figure 6 shape: per capability, normalised probe NLL over training steps, one line per left-out
    source (``curves[left_out][capability] = [[step, nll], ...]``)."""
    if not curves:
        return None
    caps = sorted({c for per in curves.values() for c in per})
    fig, axes = plt.subplots(1, len(caps), figsize=(4.2 * len(caps) + 1.5, 3.3), squeeze=False,
                             layout="constrained")
    for ax, cap in zip(axes[0], caps):
        for left_out, per in curves.items():
            pts = per.get(cap)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "k--" if left_out == "all" else "-",
                        label="all sources (baseline)" if left_out == "all" else f"w/o {left_out}")
        ax.set_title(f"probe: {cap}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel("normalised NLL")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Leave-one-out ablations")
    return _save(fig, path)


def plot_histograms(phases: list[dict[str, Any]], path: Path) -> Path | None:
    """Figure 8 shape: the influence distribution of candidate samples in each co-evolution phase
    (``phases[i] = {"edges": [...], "counts": [...]}``), with zero marked."""
    phases = [p for p in phases if p.get("counts")]
    if not phases:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, ph in enumerate(phases):
        edges, counts = ph["edges"], ph["counts"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        ax.step(centers, counts, where="mid", label=f"phase {i + 1}")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel("influence on probe loss (positive = helps)")
    ax.set_ylabel("samples")
    ax.set_title("Influence of mid-training samples per co-evolution phase")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
