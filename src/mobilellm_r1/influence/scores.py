"""Influence of training samples on capabilities' probe losses (paper Eq. 2-5).

Sign convention (the only place it is stated): **positive influence = the training sample LOWERS the mean
probe loss.** With one SGD step of size eta on sample x, the probe loss changes to first order by
``-eta <g_x, g_probe>``, so

    I_c(x) = eta * <g_x, H^-1 g_probe_c>          (Eq. 2-4; g_probe_c = gradient of the MEAN probe loss)

where H is the identity (TracIn), Adam's diagonal ``sqrt(v) + eps`` from the checkpoint's optimizer state,
or DataInf's layer-wise closed form. Over T checkpoints (Eq. 5) ``I = sum_t alpha_t I_t`` with
``alpha_t = t / sum(t)`` (t = 1..T in training order) and eta_t the checkpoint's learning rate.
Self-/cross-influence: I_c for every capability c (code, math, knowledge) on every sample; ``I_joint =
sum_c w_c I_c`` (weights from the config, default 1 each).

The exact path (``proj_dim = 0``) never materialises per-sample gradients: the probe mean gradient is one
full gradient, and ``<g_x, Q>`` comes from the hooked factors of one batched backward
(:meth:`GradientFeaturizer.dots`). Adam preconditioning is applied to the probe side (``Q = g_probe /
(sqrt(v) + eps)``), which is exact in both the exact and the projected paths. DataInf needs per-sample
features, so it runs on projected features.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..atomic import write_json, write_jsonl
from ..config import ConfigError
from .features import GradientFeaturizer, ParamSelection, pad_rows

CAPABILITIES = ("code", "math", "knowledge")
PRECONDITIONERS = ("identity", "adam", "datainf")


@dataclass
class InfluenceConfig:
    """The recipe's ``[influence]`` table (``recipe.section("influence", InfluenceConfig)``)."""

    probes: str = "probing"  # DIR with {code,math,knowledge}.jsonl (field `text`), relative to the run dir
    capabilities: list[str] = field(default_factory=lambda: list(CAPABILITIES))
    capability_weights: dict[str, float] = field(default_factory=dict)  # I_joint weights (default 1 each)
    probe_samples: int = 32  # probe documents per capability
    train_samples: int = 64  # scored windows per source
    sources: list[str] = field(default_factory=list)  # default: every source of the shards
    seq_len: int = 256
    batch_size: int = 8
    # parameters: last_k = 0 -> every block; head / embed_input: the tied embedding's two gradient parts
    last_k: int = 0
    head: bool = True
    embed_input: bool = True
    proj_dim: int = 0  # 0: exact dot products; > 0: projected features of about this many dims
    preconditioner: str = "identity"  # identity | adam | datainf
    datainf_lambda: float = 0.1  # DataInf damping, as a fraction of the mean squared per-sample norm
    checkpoints: list[str] = field(default_factory=list)  # T checkpoint dirs (Eq. 5), oldest first
    last_checkpoints: int = 3  # with a training run dir: use its newest T checkpoints
    floor: float = 0.01  # Eq. 6: non-positive rho -> floor * max positive rho (never a zero weight)
    stage: str = ""  # the stage whose [stages.X.mixture] `mix` writes
    seed: int = 0
    # Eq. 1 leave-one-out runs
    loo_steps: int = 30
    loo_batch: int = 8
    loo_lr: float = 3e-3
    loo_eval_every: int = 10
    loo_init: str = ""  # a checkpoint / stage to start from; "" = fresh init from [model]
    # Eq. 7-8 co-evolution
    coevolve_sources: list[str] = field(default_factory=list)
    coevolve_pool: int = 48  # raw windows per source scored each phase
    coevolve_steps: int = 10
    coevolve_lr: float = 3e-4
    coevolve_threshold: float = 0.3  # stop when the positive-influence share falls below this
    coevolve_max_phases: int = 3

    def __post_init__(self) -> None:
        if self.preconditioner not in PRECONDITIONERS:
            raise ConfigError(f"[influence] preconditioner {self.preconditioner!r} is not one of {PRECONDITIONERS}")
        if self.preconditioner == "datainf" and self.proj_dim <= 0:
            raise ConfigError("[influence] preconditioner = \"datainf\" needs per-sample features: set proj_dim > 0")
        if self.floor < 0:
            raise ConfigError(f"[influence] floor must be >= 0, got {self.floor}")

    @property
    def selection(self) -> ParamSelection:
        return ParamSelection(last_k=self.last_k, head=self.head, embed_input=self.embed_input)

    def weight(self, cap: str) -> float:
        return float(self.capability_weights.get(cap, 1.0))


# ------------------------------------------------------------------------------------------ samples


@dataclass
class Sample:
    """One training sample: ``ids`` (≤ seq_len + 1 tokens), its source and where it came from (a window
    start in the source's token stream, or a document number in a JSONL file)."""

    source: str
    index: int
    ids: list[int]

    @property
    def tokens(self) -> int:  # s_i of Eq. 6: the sample's target tokens
        return max(0, len(self.ids) - 1)


def shard_samples(shards, sources: Sequence[str] | None, per_source: int, seq_len: int, seed: int = 0,
                  exclude_heldout: float = 0.0) -> list[Sample]:
    """``per_source`` windows of ``seq_len + 1`` tokens per source, drawn without replacement by a seeded
    permutation (the sampler's chunk grid: stride ``seq_len``)."""
    from ..data.mixture import MixtureSampler

    out = []
    for s in sources or shards.sources:
        samp = MixtureSampler.equal(shards, [s], seq_len, seed=seed, split="train" if exclude_heldout else "all",
                                    heldout_fraction=exclude_heldout)
        for _ in range(min(per_source, samp.n_chunks[s])):
            toks, _, _, start = samp.next_row()
            out.append(Sample(s, int(start), toks.tolist()))
    return out


def jsonl_samples(paths: Sequence[str | Path], tokenizer, per_source: int, seq_len: int,
                  text_field: str = "text") -> list[Sample]:
    """The first ``per_source`` documents of each JSONL source (named by file stem), BOS + text + EOS,
    truncated to ``seq_len + 1`` tokens."""
    from ..eval.probe import read_text_sources

    out = []
    for name, docs in read_text_sources(paths, text_field).items():
        ids = tokenizer.encode_batch(docs[:per_source], bos=True, eos=True)
        out += [Sample(name, i, x[: seq_len + 1]) for i, x in enumerate(ids) if len(x) >= 2]
    return out


def load_probes(probe_dir: str | Path, tokenizer, capabilities: Sequence[str], n: int, seq_len: int
                ) -> dict[str, list[list[int]]]:
    """Probe token rows per capability from ``DIR/{cap}.jsonl`` (field ``text``; issue 6's curation output)."""
    from ..eval.probe import read_text_sources

    d = Path(probe_dir)
    out = {}
    for cap in capabilities:
        p = d / f"{cap}.jsonl"
        if not p.is_file():
            raise FileNotFoundError(f"probing set {p} is missing (expected {', '.join(f'{c}.jsonl' for c in capabilities)} "
                                    f"in {d})")
        docs = read_text_sources([p])[cap][:n]
        rows = [x[: seq_len + 1] for x in tokenizer.encode_batch(docs, bos=True, eos=True) if len(x) >= 2]
        if not rows:
            raise ValueError(f"{p}: no probe text with at least one token")
        out[cap] = rows
    return out


def _batches(rows: Sequence[list[int]], batch: int, seq_len: int, pad: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [pad_rows(list(rows[i:i + batch]), seq_len, pad) for i in range(0, len(rows), batch)]


# ------------------------------------------------------------------------------------- preconditioner


def adam_second_moments(optim_state: dict[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``exp_avg_sq`` per parameter name from a checkpoint's ``optim.pt`` (full state dict keyed by name;
    a ``student.``/``module.`` prefix is ignored)."""
    state = optim_state.get("state", {})
    by_name = {}
    for k, v in state.items():
        key = str(k)
        for pre in ("student.", "module.", "_orig_mod."):
            key = key.removeprefix(pre)
        if isinstance(v, dict) and "exp_avg_sq" in v:
            by_name[key] = v["exp_avg_sq"]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"the optimizer state has no Adam second moment for {missing[0]!r} "
                          f"({len(by_name)} parameters found): cannot use preconditioner = \"adam\"")
    return {n: by_name[n].float() for n in names}


def optimizer_lr_eps(optim_state: dict[str, Any]) -> tuple[float, float]:
    groups = optim_state.get("param_groups") or [{}]
    return float(groups[0].get("lr", 1.0)), float(groups[0].get("eps", 1e-8))


# ------------------------------------------------------------------------------------------ scoring


def _reduce(t: torch.Tensor, info) -> torch.Tensor:
    if info is not None and info.enabled:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
    return t


def score_model(model, samples: Sequence[Sample], probes: dict[str, list[list[int]]], cfg: InfluenceConfig, *,
                lr: float = 1.0, adam_v: dict[str, torch.Tensor] | None = None, eps: float = 1e-8,
                pad_id: int = 0, info=None, progress=None) -> np.ndarray:
    """``(len(samples), C)`` influence of each sample on each capability's mean probe loss at one
    checkpoint (Eq. 2-4), ``eta = lr``. ``info``: a :class:`~mobilellm_r1.train.distributed.DistInfo` when
    the samples are this rank's share (DataInf's sums are then all-reduced)."""
    model.eval()  # no dropout in our models; eval only changes nothing else
    caps = list(probes)
    calib = _batches(probes[caps[0]], cfg.batch_size, cfg.seq_len, pad_id)[0] if cfg.proj_dim > 0 else None
    f = GradientFeaturizer(model, cfg.selection, proj_dim=cfg.proj_dim, seed=cfg.seed, calibrate=calib)
    queries = []
    for c in caps:
        q = f.mean_gradient(_batches(probes[c], cfg.batch_size, cfg.seq_len, pad_id))
        if cfg.preconditioner == "adam":
            if adam_v is None:
                raise ConfigError("preconditioner = \"adam\" needs a checkpoint with its optimizer state (optim.pt)")
            q = {n: v / (adam_v[n].to(v.device).sqrt() + eps) for n, v in q.items()}
        queries.append(q)
    batches = _batches([s.ids for s in samples], cfg.batch_size, cfg.seq_len, pad_id)
    out = []
    if cfg.proj_dim <= 0:
        for inp, tgt in batches:
            d, _ = f.dots(inp, tgt, queries)
            out.append(d.numpy())
            if progress is not None:
                progress(inp.shape[0])
        return lr * np.concatenate(out) if out else np.zeros((0, len(caps)))
    qf = torch.stack([f.project(q) for q in queries])  # (C, D)
    feats = []
    for inp, tgt in batches:
        feats.append(f.features(inp, tgt)[0].double().cpu())
        if progress is not None:
            progress(inp.shape[0])
    F_ = torch.cat(feats) if feats else torch.zeros(0, f.dim, dtype=torch.float64)
    qf = qf.double().cpu()
    if cfg.preconditioner == "datainf":
        qf = datainf_queries(F_, qf, f.slices, cfg.datainf_lambda, info)
    return lr * (F_ @ qf.t()).numpy()


def datainf_queries(feats: torch.Tensor, queries: torch.Tensor, slices: dict[str, slice], lam_frac: float,
                    info=None) -> torch.Tensor:
    """DataInf's layer-wise inverse-Hessian-vector products (Kwon et al. 2024), per parameter block l:
    ``H_l^-1 v ~= (1/lambda_l) (v - mean_i [(g_i.v) / (lambda_l + |g_i|^2)] g_i)`` with
    ``lambda_l = lam_frac * mean_i |g_i|^2``; the means run over all (ranks') scored samples."""
    out = queries.clone()
    n = _reduce(torch.tensor([float(feats.shape[0])], dtype=torch.float64), info)[0]
    for sl in slices.values():
        g = feats[:, sl]
        sq = g.pow(2).sum(1)
        lam = lam_frac * float(_reduce(sq.sum()[None], info)[0] / n)
        lam = max(lam, 1e-30)
        for j in range(queries.shape[0]):
            v = queries[j, sl]
            c = (g @ v) / (lam + sq)
            corr = _reduce(c @ g, info) / n
            out[j, sl] = (v - corr) / lam
    return out


def checkpoint_weights(n: int) -> list[float]:
    """Eq. 5: alpha_t proportional to t (t = 1..T, oldest first), summing to 1."""
    tot = n * (n + 1) / 2
    return [(t + 1) / tot for t in range(n)]


def joint(scores: np.ndarray, caps: Sequence[str], cfg: InfluenceConfig) -> np.ndarray:
    """I_joint = sum_c w_c I_c (the cross-capability combination of self- and cross-influence)."""
    w = np.array([cfg.weight(c) for c in caps])
    return scores @ w


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def summarize(samples: Sequence[Sample], scores: np.ndarray, caps: Sequence[str], cfg: InfluenceConfig
              ) -> dict[str, Any]:
    """Per source x capability: token-weighted mean influence (the self/cross-influence matrix), the
    share of samples with positive I_joint, sample and token counts."""
    j = joint(scores, caps, cfg)
    per: dict[str, Any] = {}
    for src in dict.fromkeys(s.source for s in samples):
        idx = [i for i, s in enumerate(samples) if s.source == src]
        tok = np.array([samples[i].tokens for i in idx], dtype=np.float64)
        per[src] = {"samples": len(idx), "tokens": int(tok.sum()),
                    "influence": {c: float((scores[idx, k] * tok).sum() / max(tok.sum(), 1)) for k, c in enumerate(caps)},
                    "joint": float((j[idx] * tok).sum() / max(tok.sum(), 1)),
                    "positive_share": float((j[idx] > 0).mean()) if idx else 0.0}
    return per


# ------------------------------------------------------------------------------- checkpoints, I/O


def score_checkpoints(checkpoints: Sequence[str | Path], samples: Sequence[Sample],
                      probes_text: dict[str, list[list[int]]], cfg: InfluenceConfig, info=None,
                      progress: bool = False) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Eq. 5 over T checkpoints: ``sum_t alpha_t I_t`` ``(N, C)``, plus what was used per checkpoint."""
    from ..model.gguf import load_any
    from ..train.checkpoint import OPTIM

    total = None
    used = []
    alphas = checkpoint_weights(len(checkpoints))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples) * len(checkpoints), desc="influence", unit="sample", dynamic_ncols=True)
    try:
        for alpha, ck in zip(alphas, checkpoints):
            model, meta = load_any(str(ck), device="cpu", dtype=torch.float32)
            opt_path = Path(ck) / OPTIM
            lr, eps, v = 1.0, 1e-8, None
            if opt_path.is_file():
                state = torch.load(opt_path, map_location="cpu", weights_only=False)
                lr, eps = optimizer_lr_eps(state)
                if cfg.preconditioner == "adam":
                    names = [n for n, _ in model.named_parameters()]
                    v = adam_second_moments(state, names)
            elif cfg.preconditioner == "adam":
                raise ConfigError(f"{ck} has no {OPTIM}: preconditioner = \"adam\" needs a training checkpoint")
            s = score_model(model, samples, probes_text, cfg, lr=lr, adam_v=v, eps=eps, pad_id=model.cfg.pad_id
                            if model.cfg.pad_id < model.cfg.vocab_size else 0, info=info,
                            progress=bar.update if bar is not None else None)
            total = alpha * s if total is None else total + alpha * s
            used.append({"checkpoint": str(ck), "alpha": alpha, "lr": lr})
    finally:
        if bar is not None:
            bar.close()
    return total, used


def resolve_checkpoints(specs: Sequence[str], last: int) -> list[str]:
    """Checkpoint directories: a training run dir expands to its newest ``last`` step checkpoints."""
    from ..train.checkpoint import list_checkpoints

    out = []
    for s in specs:
        found = list_checkpoints(s)
        if found:
            out += [str(p) for _, p in found[-last:]]
        elif Path(s).exists() or s.endswith(".gguf") or s == "smollm2":
            out.append(s)
        else:
            raise FileNotFoundError(f"checkpoint {s} does not exist")
    if not out:
        raise ConfigError("no checkpoints to score with")
    return out


def write_scores(out: str | Path, samples: Sequence[Sample], scores: np.ndarray, caps: Sequence[str],
                 cfg: InfluenceConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """``OUT/scores.jsonl`` (one line per sample) and ``OUT/summary.json``, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    j = joint(scores, caps, cfg)
    write_jsonl(out / "scores.jsonl", ({"source": s.source, "index": s.index, "tokens": s.tokens,
                                         "influence": dict(zip(caps, map(float, row))), "joint": float(jj)}
                                        for s, row, jj in zip(samples, scores, j)))
    from ..config import to_dict

    summary = {"capabilities": list(caps), "samples": len(samples), "sources": summarize(samples, scores, caps, cfg),
               "config": to_dict(cfg), **extra}
    write_json(out / "summary.json", summary, indent=2)
    return summary


def read_scores(d: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    d = Path(d)
    p = d / "scores.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no influence scores at {d} (missing scores.jsonl; run `mobilellm-r1 influence score`)")
    rows = []
    for ln, line in enumerate(p.read_text().splitlines(), 1):
        try:
            r = json.loads(line)
            float(r["joint"]), int(r["tokens"]), str(r["source"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{p}:{ln}: bad score line ({e})") from None
        rows.append(r)
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    return rows, summary


def finite(x: float) -> bool:
    return math.isfinite(x)
