"""`mobilellm-r1 demo`: the embedded default, end to end, on a CPU.

Until the full stage graph exists (pipeline.py), the demo runs what is built of ``recipes/tiny.toml``:
build the embedded corpus → tokenize every recipe source into shards → draw the first stage's mixture
and compare realised token shares with the recipe's weights → pre-train the tiny model (first stage) and
report its held-out loss before and after. The corpus and shards are cached in the run directory; the
training stage resumes from its newest checkpoint when interrupted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .config import Recipe, load_recipe, resolve_recipe


def source_inputs(recipe: Recipe, corpus_dir: Path) -> dict[str, list[str]]:
    """Local inputs per recipe source: relative paths resolve against the corpus folder, and a source
    with no paths reads ``<corpus>/<name>.jsonl``."""
    out = {}
    for s in recipe.data.sources:
        paths = s.paths or [f"{s.name}.jsonl"]
        out[s.name] = [p if Path(p).is_absolute() or p.startswith("hf:") else str(corpus_dir / p) for p in paths]
    return out


def run_demo(recipe_path: str, out: Path, sequences: int = 2000, progress: bool = True,
             train_steps: int | None = None) -> dict[str, Any]:
    from .data.corpus import build_corpus
    from .data.mixture import MixtureSampler
    from .data.shards import INDEX_FILE, ShardSet, TokenizeOptions, read_index, tokenize_sources

    recipe = load_recipe(resolve_recipe(recipe_path))
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    corpus_dir = out / "corpus"
    manifest = build_corpus(corpus_dir, progress=progress)
    timings["build_corpus"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    shard_dir = out / "shards"
    inputs = source_inputs(recipe, corpus_dir)
    have = read_index(shard_dir)["sources"] if (shard_dir / INDEX_FILE).is_file() else {}
    todo = {n: p for n, p in inputs.items() if n not in have or have[n]["inputs"] != p}
    if todo:
        tokenize_sources(todo, shard_dir, TokenizeOptions(tokenizer=recipe.data.tokenizer, progress=progress))
    timings["tokenize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stage_name = recipe.first_training_stage()
    stage = recipe.stage(stage_name)
    shards = ShardSet(shard_dir)
    sampler = MixtureSampler(shards, stage.mixture, seq_len=stage.seq_len, seed=recipe.run.seed)
    for _ in range(sequences):
        next(sampler)
    timings["sample"] = time.perf_counter() - t0

    train = None
    if train_steps != 0:
        from .train.checkpoint import list_checkpoints
        from .train.loop import TrainOptions, train_stage

        t0 = time.perf_counter()
        stage_out = out / stage_name
        done = (stage_out / "final").is_dir() and not train_steps
        if not done:
            opts = TrainOptions(out=str(stage_out), max_steps=train_steps or 0, shards=str(shard_dir),
                                resume=bool(list_checkpoints(stage_out)), progress=progress)
            res = train_stage(recipe, stage_name, opts)
            train = {k: res.get(k) for k in ("steps", "final_loss", "tokens_per_s", "mfu", "heldout_loss_initial",
                                             "heldout_loss_final", "checkpoint")}
        else:
            train = {"checkpoint": str(stage_out / "final"), "cached": True}
        timings["train"] = time.perf_counter() - t0
    return {
        "recipe": str(recipe.path), "out": str(out),
        "corpus": {"mb": manifest["total_bytes"] / 1e6,
                   "sources": {n: m["category"] for n, m in manifest["sources"].items() if m["status"] == "ok"}},
        "shards": {n: {"tokens": shards.n_tokens(n), "docs": shards.index["sources"][n]["docs"],
                       "skipped": shards.index["sources"][n]["stats"]["skipped"]} for n in shards.sources},
        "tokenizer": shards.index["tokenizer"],
        "stage": stage_name, "seq_len": stage.seq_len, "sequences": sequences,
        "target_shares": sampler.target_shares(), "realised_shares": sampler.token_shares(),
        "train": train, "seconds": timings,
    }


def cmd_demo(args: argparse.Namespace) -> int:
    from .cli import print_json

    res = run_demo(args.recipe, Path(args.out), args.sequences, progress=not args.json, train_steps=args.train_steps)
    if args.json:
        print_json(res)
        return 0
    print(f"\nmobilellm-r1 demo: {res['recipe']} → {res['out']}")
    print(f"corpus: {res['corpus']['mb']:.1f} MB of real text from {len(res['corpus']['sources'])} sources")
    print(f"shards ({res['tokenizer']} tokenizer):")
    for n, s in res["shards"].items():
        print(f"  {n:22s} {s['tokens']:>11,d} tokens {s['docs']:>8,d} docs ({s['skipped']} skipped)")
    print(f"mixture of stage {res['stage']!r}: {res['sequences']} sequences of {res['seq_len'] + 1} tokens")
    for n, w in res["target_shares"].items():
        print(f"  {n:22s} target {w:.3f}  realised {res['realised_shares'][n]:.3f}")
    tr = res["train"]
    if tr and not tr.get("cached"):
        print(f"pre-training {res['stage']!r}: {tr['steps']} steps, {tr['tokens_per_s']:,.0f} tokens/s"
              + (f", MFU {tr['mfu']:.1%}" if tr.get("mfu") else ""))
        if tr.get("heldout_loss_final") is not None and tr.get("heldout_loss_initial") is not None:
            print(f"  held-out loss {tr['heldout_loss_initial']:.3f} -> {tr['heldout_loss_final']:.3f} nats/token")
        print(f"  checkpoint {tr['checkpoint']}")
    elif tr:
        print(f"pre-training {res['stage']!r}: already done, checkpoint {tr['checkpoint']}")
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in res["seconds"].items()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded default recipe (recipes/tiny.toml) on this machine")
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--out", default="runs/tiny")
    p.add_argument("--sequences", type=int, default=2000)
    p.add_argument("--train-steps", type=int, default=None,
                   help="train the first stage for this many steps (default: the recipe's; 0 = skip training)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
