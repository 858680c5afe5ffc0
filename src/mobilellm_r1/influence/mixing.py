"""Dataset weights from influence (paper Eq. 6).

    rho_g = (1 / N_g) * sum_{i in g} I_joint(x_i) * s_i          w_g = rho_g / sum_g' rho_g'

with s_i the target tokens of sample i and N_g the tokens of the scored samples of source g: rho_g is the
token-weighted mean influence per token, an estimate of the per-token influence of the whole source when
its samples are drawn uniformly.

Negative rho: Eq. 6 is undefined for it (a negative weight is not a sampling rate). A source with
``rho_g <= floor * max_g rho_g`` gets that floor instead, so a harmful source is down-weighted to a small
share but never dropped outright (a zero weight would also remove it from every later re-scoring). With
no positive rho at all the mixture falls back to uniform and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..atomic import write_text


def source_rho(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Eq. 6's rho_g from score rows ``{"source", "tokens", "joint"}``."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for r in rows:
        g = r["source"]
        num[g] = num.get(g, 0.0) + float(r["joint"]) * int(r["tokens"])
        den[g] = den.get(g, 0.0) + int(r["tokens"])
    return {g: num[g] / den[g] if den[g] else 0.0 for g in num}


def weights_from_rho(rho: dict[str, float], floor: float = 0.01) -> tuple[dict[str, float], list[str]]:
    """Normalised weights (sum 1) and the sources that were clamped to the floor."""
    if not rho:
        raise ValueError("no sources to weight")
    top = max(rho.values())
    if top <= 0:
        return {g: 1.0 / len(rho) for g in rho}, sorted(rho)
    lo = floor * top
    clamped = sorted(g for g, r in rho.items() if r <= lo)
    raw = {g: max(r, lo) for g, r in rho.items()}
    tot = sum(raw.values())
    return {g: v / tot for g, v in raw.items()}, clamped


def mixture_toml(stage: str, weights: dict[str, float], rho: dict[str, float], clamped: Sequence[str]) -> str:
    lines = [f"[stages.{stage}.mixture]",
             "# Eq. 6: w_g proportional to rho_g = token-weighted mean I_joint; written by `mobilellm-r1 mix`"]
    for g, w in weights.items():
        note = "  # clamped to the floor" if g in clamped else ""
        lines.append(f"{_key(g)} = {w:.6f}  # rho = {rho[g]:.6g}{note}")
    return "\n".join(lines) + "\n"


def _key(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() else '"' + name.replace('"', '\\"') + '"'


def mix(rows: Sequence[dict[str, Any]], out: str | Path | None, stage: str = "mix", floor: float = 0.01
        ) -> dict[str, Any]:
    """Weights from score rows, written as a TOML mixture block to ``out`` (atomically) when given."""
    rho = source_rho(rows)
    w, clamped = weights_from_rho(rho, floor)
    text = mixture_toml(stage, w, rho, clamped)
    if out is not None:
        write_text(out, text)
    return {"weights": w, "rho": rho, "clamped": clamped, "floor": floor, "stage": stage,
            "toml": text, "out": str(out) if out is not None else None}
