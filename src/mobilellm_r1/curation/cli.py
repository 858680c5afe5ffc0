"""``mobilellm-r1 curate``: the Figure-5 curation pipeline on a folder of sources."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curate", help="quality -> Ask-LLM -> domain Ask-LLM -> semantic dedup -> probing sets "
                                      "(paper section 5.1.1)")
    p.add_argument("--recipe", default="tiny", help="recipe name or TOML path ([curation] and source capabilities)")
    p.add_argument("--sources", required=True,
                   help="folder with one sub-folder per source, or flat <source>.jsonl[.gz] files (a built corpus)")
    p.add_argument("--out", required=True, help="output folder (scores are cached here: re-runs reuse them)")
    p.add_argument("--scorer", help="Ask-LLM model: smollm2, a .gguf, our checkpoint or a HF llama4 dir")
    p.add_argument("--embedder", help="sentence-transformers model dir (default: the offline MiniLM)")
    p.add_argument("--quality-classifier", help="local FineWeb-Edu classifier dir (default: the offline stand-in)")
    p.add_argument("--workers", type=int, help="scoring processes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..cli import UserError, print_json
    from ..config import ConfigError, load_recipe, resolve_recipe
    from .pipeline import CurationConfig, discover_sources, run_curation

    recipe = load_recipe(resolve_recipe(args.recipe))
    try:
        cfg = recipe.section("curation", CurationConfig)
    except ValueError as e:  # CurationConfig's own checks
        raise ConfigError(f"{recipe.path}: {e}") from None
    overrides = {k: v for k, v in (("scorer", args.scorer), ("embedder", args.embedder),
                                   ("quality_classifier", args.quality_classifier),
                                   ("workers", args.workers)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    sources = discover_sources(args.sources)
    caps = {s.name: list(s.capabilities) for s in recipe.data.sources}
    try:
        summary = run_curation(cfg, sources, args.out, caps, progress=not args.no_progress)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        print_json(summary)
    else:
        for name, st in summary["steps"].items():
            if "kept" in st:
                rate = f"  {st['samples_per_s']} samples/s" if st.get("samples_per_s") else ""
                print(f"{name:8s} kept {st['kept']:6d} / {st['in']:6d}  ({st['kept_fraction']:.1%}){rate}")
        for cap, c in summary["probing"].items():
            print(f"probing/{cap}.jsonl: {c['total']} samples")
        print(f"summary: {summary['out']}/summary.json")
    return 0
