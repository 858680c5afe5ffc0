"""`mobilellm-r1 run RECIPE` and `mobilellm-r1 demo` (= `run tiny`, what `make demo` runs).

The stage graph and its manifests live in :mod:`mobilellm_r1.pipeline`, what each stage does in
:mod:`mobilellm_r1.stages`; this module is the command line around them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .config import load_recipe, resolve_recipe


def _print_plan(plan: dict[str, Any]) -> None:
    print(f"recipe {plan['recipe']}: {plan['model_params']:,} parameters")
    for row in plan["stages"]:
        extra = ""
        if "tokens" in row:
            extra = f"  {row['tokens']:>16,.0f} tokens  {row['gpu_hours']:>10.1f} GPU-h"
        print(f"  {row['stage']:16s} {row['kind']:10s}{extra}   after: {', '.join(row['deps']) or '-'}")
    a = plan["assumptions"]
    print(f"total ≈ {plan['gpu_hours_total']:.1f} GPU-hours at {a['mfu']:.0%} MFU of {a['gpu_peak_flops'] / 1e12:.0f} "
          "TFLOP/s (H100 bf16)")


def cmd_run(args: argparse.Namespace) -> int:
    from . import stages  # noqa: F401  (registers the stage runners)
    from .cli import print_json
    from .pipeline import RunOptions, dry_run, run_pipeline

    recipe = load_recipe(resolve_recipe(args.recipe))
    if args.dry_run:
        plan = dry_run(recipe)
        print_json(plan) if args.json else _print_plan(plan)
        return 0
    quiet = args.json
    opts = RunOptions(out=args.out or "", from_stage=args.from_stage or "", only=args.only or "",
                      until=args.until or "", progress=not quiet,
                      log=None if quiet else (lambda s: print(f"mobilellm-r1 run: {s}", file=sys.stderr, flush=True)))
    res = run_pipeline(recipe, opts)
    if args.json:
        print_json(res)
    else:
        print("stage timings: " + ", ".join(f"{s['stage']} {s['seconds']:.0f}s"
                                            + (" (cached)" if s["status"] == "cached" else "") for s in res["stages"]))
        report = Path(res["run_dir"]) / "report.html"
        if report.is_file():
            print(f"report: {report}")
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="", help="run directory (default runs/<run.name>)")
    p.add_argument("--from", dest="from_stage", default="", help="re-run this stage and every stage after it")
    p.add_argument("--only", default="", help="run only this stage (the stages it needs must be done)")
    p.add_argument("--until", default="", help="stop after this stage")
    p.add_argument("--dry-run", action="store_true", help="print the plan, token budgets and GPU-hours")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe's whole stage graph (resumable; skips finished stages)")
    p.add_argument("recipe", help="a recipe name in recipes/ (tiny, 140m, …) or a TOML path")
    _add_run_args(p)
    p = sub.add_parser("demo", help="run the embedded default recipe (recipes/tiny.toml) end to end")
    p.add_argument("--recipe", default="tiny")
    _add_run_args(p)
