"""`mobilellm-r1 influence score`, `mix`, `loo`, `coevolve`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .scores import InfluenceConfig


def _config(args) -> tuple[InfluenceConfig, object]:
    from ..config import build, load_recipe, resolve_recipe, to_dict

    recipe = load_recipe(resolve_recipe(args.recipe)) if getattr(args, "recipe", None) else None
    cfg = recipe.section("influence", InfluenceConfig) if recipe else InfluenceConfig()
    over = {k: v for k, v in {"proj_dim": getattr(args, "proj_dim", None),
                              "preconditioner": getattr(args, "preconditioner", None),
                              "train_samples": getattr(args, "samples", None),
                              "probe_samples": getattr(args, "probe_samples", None),
                              "seq_len": getattr(args, "seq_len", None)}.items() if v is not None}
    if over:
        cfg = build(InfluenceConfig, {**to_dict(cfg), **over}, "influence options")
    return cfg, recipe


def _shards(path: str):
    from ..data.shards import ShardSet

    return ShardSet(path)


def cmd_score(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from ..model.io import read_meta
    from ..tokenizer import load_tokenizer
    from ..train import distributed as D
    from .scores import jsonl_samples, load_probes, resolve_checkpoints, score_checkpoints, shard_samples, write_scores

    cfg, _ = _config(args)
    info = D.init_distributed("cpu")
    ckpts = resolve_checkpoints(args.checkpoints, cfg.last_checkpoints)
    tok_spec = args.tokenizer
    if not tok_spec:
        try:
            tok_spec = read_meta(ckpts[0]).get("tokenizer", "")
        except Exception:  # noqa: BLE001 - a GGUF / HF dir: fall back below
            tok_spec = ""
    tok_spec = tok_spec or ("smollm2" if ckpts[0] == "smollm2" else "")
    if not tok_spec:
        raise UserError(f"cannot tell the tokenizer of {ckpts[0]}: pass --tokenizer")
    tok = load_tokenizer(tok_spec)
    train = [Path(p) for p in args.train]
    if len(train) == 1 and (train[0] / "index.json").is_file():
        samples = shard_samples(_shards(str(train[0])), cfg.sources or None, cfg.train_samples, cfg.seq_len, cfg.seed)
    else:
        for p in train:
            if not p.exists():
                raise FileNotFoundError(f"training data {p} does not exist")
        samples = jsonl_samples([str(p) for p in train], tok, cfg.train_samples, cfg.seq_len)
    if not samples:
        raise UserError("no training samples to score")
    probes = load_probes(args.probes, tok, cfg.capabilities, cfg.probe_samples, cfg.seq_len)
    mine = samples[info.rank::info.world_size]  # torchrun: each rank scores a disjoint share
    t0 = time.perf_counter()
    scores, used = score_checkpoints(ckpts, mine, probes, cfg, info=info, progress=not args.json and info.is_main)
    secs = time.perf_counter() - t0
    parts = D.gather_objects((info.rank, scores), info)
    if not info.is_main:
        D.shutdown()
        return 0
    import numpy as np

    full = np.zeros((len(samples), len(probes)))
    for r, s in parts:
        full[r::info.world_size] = s
    summary = write_scores(args.out, samples, full, list(probes), cfg,
                           {"checkpoints": used, "seconds": secs, "samples_per_s": len(mine) * len(ckpts) / secs,
                            "world_size": info.world_size, "tokenizer": tok_spec})
    D.shutdown()
    if args.json:
        print_json({k: v for k, v in summary.items() if k != "config"})
        return 0
    print(f"influence of {len(samples)} samples on {', '.join(probes)} over {len(ckpts)} checkpoint(s) "
          f"in {secs:.1f}s ({len(mine) * len(ckpts) / secs:.2f} samples/s per rank) -> {args.out}")
    for src, row in summary["sources"].items():
        print(f"  {src:16s} " + " ".join(f"{c}={v:+.3e}" for c, v in row["influence"].items())
              + f"  joint={row['joint']:+.3e}  positive={row['positive_share']:.2f}")
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from ..cli import print_json
    from .mixing import mix
    from .scores import read_scores

    rows, summary = read_scores(args.scores)
    cfg = summary.get("config", {})
    res = mix(rows, args.out, stage=args.stage or cfg.get("stage") or "mix",
              floor=args.floor if args.floor is not None else float(cfg.get("floor", 0.01)))
    if args.json:
        print_json({k: v for k, v in res.items() if k != "toml"})
        return 0
    print(res["toml"], end="")
    print(f"-> {res['out']}")
    return 0


def _recipe_inputs(args, cfg, recipe):
    """Shards, sources, probes and the starting model of a recipe's LOO / co-evolution runs."""
    import torch

    from ..cli import UserError
    from ..model.transformer import Transformer
    from ..tokenizer import load_tokenizer
    from .scores import load_probes

    shards_dir = Path(args.shards or recipe.data.shards_dir)
    if not shards_dir.is_absolute() and not (shards_dir / "index.json").is_file():
        shards_dir = Path(args.out).parent / shards_dir
    shards = _shards(str(shards_dir))
    probe_dir = Path(args.probes or cfg.probes)
    if not probe_dir.is_absolute() and not probe_dir.is_dir():
        probe_dir = Path(args.out).parent / probe_dir
    tok = load_tokenizer(recipe.data.tokenizer)
    probes = load_probes(probe_dir, tok, cfg.capabilities, cfg.probe_samples, cfg.seq_len)
    init = args.init or cfg.loo_init
    if init:
        from ..model.gguf import load_any

        model, _ = load_any(init, device="cpu", dtype=torch.float32)
    else:
        torch.manual_seed(recipe.run.seed)
        model = Transformer(recipe.model)
    if shards.index["vocab_size"] > model.cfg.vocab_size:
        raise UserError(f"shards use {shards.index['vocab_size']} ids, the model has {model.cfg.vocab_size}")
    return shards, probes, model, recipe.data.heldout_fraction


def cmd_loo(args: argparse.Namespace) -> int:
    from ..atomic import write_json
    from ..cli import print_json
    from .loo import run_loo

    cfg, recipe = _config(args)
    shards, probes, model, held = _recipe_inputs(args, cfg, recipe)
    sources = cfg.sources or list((recipe.stages[recipe.first_training_stage()].mixture or {}).keys()) or shards.sources
    res = run_loo(model, shards, sources, probes, steps=cfg.loo_steps, batch=cfg.loo_batch, seq_len=cfg.seq_len,
                  lr=cfg.loo_lr, eval_every=cfg.loo_eval_every, seed=recipe.run.seed, heldout_fraction=held,
                  progress=not args.json)
    write_json(Path(args.out) / "loo.json", res)
    if args.json:
        print_json({k: res[k] for k in ("delta_l", "delta_l_relative", "seconds", "steps")})
        return 0
    print(f"LOO (Eq. 1): Delta-L = L(without g) - L(all), nats/token, {cfg.loo_steps} steps per run "
          f"({res['seconds']:.0f}s) -> {args.out}/loo.json")
    for g, row in res["delta_l"].items():
        print(f"  {g:16s} " + " ".join(f"{c}={v:+.4f}" for c, v in row.items()))
    return 0


def cmd_coevolve(args: argparse.Namespace) -> int:
    from ..atomic import write_json
    from ..cli import print_json
    from .coevolve import coevolve

    cfg, recipe = _config(args)
    shards, probes, model, _ = _recipe_inputs(args, cfg, recipe)
    sources = cfg.coevolve_sources or shards.sources
    res = coevolve(model, shards, sources, probes, cfg, progress=not args.json)
    write_json(Path(args.out) / "coevolve.json", res)
    if args.json:
        print_json({"phases": [{k: p[k] for k in ("phase", "positive_share", "pool") if k in p}
                               | {"retained": len(p["retained"]), "weights": p.get("weights")} for p in res["phases"]],
                    "seconds": res["seconds"], "out": str(Path(args.out) / "coevolve.json")})
        return 0
    print(f"co-evolution: {len(res['phases'])} phase(s) in {res['seconds']:.0f}s -> {args.out}/coevolve.json")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("influence", help="influence of training samples on capability probe losses (Eq. 2-5)")
    isub = p.add_subparsers(dest="influence_command", metavar="SUBCOMMAND")
    isub.required = True
    s = isub.add_parser("score", help="score training samples against probing sets at T checkpoints")
    s.add_argument("--checkpoints", nargs="+", required=True,
                   help="checkpoint dirs (oldest first), or a training run dir (its newest [influence] last_checkpoints)")
    s.add_argument("--train", nargs="+", required=True, help="a token-shard dir, or JSONL files (source = file stem)")
    s.add_argument("--probes", required=True, help="DIR with code.jsonl, math.jsonl, knowledge.jsonl (field text)")
    s.add_argument("--out", required=True)
    s.add_argument("--recipe", help="read [influence] from this recipe")
    s.add_argument("--tokenizer", default="", help="default: the checkpoint's")
    s.add_argument("--proj-dim", type=int, default=None, help="0 = exact (default from the recipe)")
    s.add_argument("--preconditioner", choices=["identity", "adam", "datainf"], default=None)
    s.add_argument("--samples", type=int, default=None, help="samples per source")
    s.add_argument("--probe-samples", type=int, default=None)
    s.add_argument("--seq-len", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_score)

    m = sub.add_parser("mix", help="dataset weights from influence scores (Eq. 6) as a TOML mixture block")
    m.add_argument("--scores", required=True, help="the `influence score` output dir")
    m.add_argument("--out", required=True, help="mixture TOML file to write")
    m.add_argument("--stage", default="", help="stage name of the [stages.X.mixture] block")
    m.add_argument("--floor", type=float, default=None)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_mix)

    for name, fn, helptext in (("loo", cmd_loo, "leave-one-out source ablations (Eq. 1)"),
                               ("coevolve", cmd_coevolve, "mid-training data-model co-evolution (Eq. 7-8)")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--recipe", required=True)
        c.add_argument("--out", required=True)
        c.add_argument("--shards", default="", help="default: the recipe's data.shards_dir")
        c.add_argument("--probes", default="", help="default: the recipe's [influence] probes")
        c.add_argument("--init", default="", help="start model (checkpoint); default [influence] loo_init or fresh")
        c.add_argument("--json", action="store_true")
        c.set_defaults(func=fn)
