"""`mobilellm-r1 data …`: build the embedded corpus, tokenize to shards, verify them, sample a mixture."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..atomic import write_json


def parse_weights(text: str) -> dict[str, float]:
    """``"a=0.5,b=0.5"`` → ``{"a": 0.5, "b": 0.5}``."""
    from ..cli import UserError

    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(val)
        except ValueError:
            raise UserError(f"--weights: {part!r} is not SOURCE=WEIGHT") from None
        if out[name.strip()] < 0:
            raise UserError(f"--weights: negative weight for {name.strip()!r}")
    if not out:
        raise UserError("--weights is empty")
    return out


def cmd_tokenize(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from .shards import TokenizeOptions, tokenize_sources
    from .sources import group_inputs

    for p in args.input:
        if not p.startswith("hf:") and not Path(p).exists():
            raise UserError(f"input not found: {p}")
    inputs = group_inputs(args.input)
    opts = TokenizeOptions(tokenizer=args.tokenizer, workers=args.workers, text_field=args.text_field,
                           max_docs=args.max_docs,
                           shard_tokens=args.shard_tokens, progress=not args.json and not args.quiet)
    try:
        index = tokenize_sources(inputs, args.out, opts)
    except ValueError as e:
        raise UserError(str(e)) from None
    summary = {
        "out": str(args.out), "tokenizer": index["tokenizer"], "dtype": index["dtype"],
        "sources": {n: {"tokens": index["sources"][n]["tokens"], "docs": index["sources"][n]["docs"],
                        **{k: v for k, v in index["sources"][n]["stats"].items() if k != "examples"},
                        "examples": index["sources"][n]["stats"]["examples"]} for n in inputs},
        **index["run"],
    }
    if args.json:
        print_json(summary)
    else:
        for n, s in summary["sources"].items():
            print(f"{n:24s} {s['tokens']:>12,d} tokens {s['docs']:>9,d} docs  skipped {s['skipped']} "
                  f"(malformed {s['malformed']}, invalid utf-8 {s['invalid_utf8']}, "
                  f"missing field {s['missing_field']}, empty {s['empty']})")
        print(f"{summary['tokens']:,d} tokens in {summary['seconds']:.1f}s "
              f"({summary['tokens_per_s']:,.0f} tokens/s, {summary['workers']} workers) → {args.out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..cli import print_json
    from .shards import verify_shards

    res = verify_shards(args.shards, progress=not args.json and not args.quiet, workers=args.workers)
    if args.json:
        print_json(res)
    else:
        print(f"{res['files']} files, {res['checksummed']} checksummed ({res['bytes'] / 1e6:,.1f} MB at "
              f"{res['mb_per_s']:,.0f} MB/s)" + (f", {res['unchecked']} without a recorded checksum (sizes only)"
                                                 if res["unchecked"] else "") + (": all intact" if res["ok"] else ""))
    for b in res["bad"]:  # one line per damaged file, with the command that rewrites its source
        print(f"mobilellm-r1 data verify: {b['line']}", file=sys.stderr)
    return 0 if res["ok"] else 1


def cmd_sample(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from .mixture import MixtureSampler
    from .shards import ShardSet

    shards = ShardSet(args.shards)
    weights = parse_weights(args.weights) if args.weights else {s: 1.0 for s in shards.sources}
    for s in weights:
        if s not in shards.sources:
            raise UserError(f"--weights names {s!r}, which is not in {args.shards} (sources: {', '.join(shards.sources)})")
    exclude = [s for s in (args.exclude or "").split(",") if s]
    try:
        sampler = MixtureSampler(shards, weights, args.seq_len, seed=args.seed, rank=args.rank,
                                 world_size=args.world_size, repeat=not args.no_repeat, exclude=exclude)
        if args.state_in:
            sampler.load_state_dict(json.loads(Path(args.state_in).read_text()))
    except (KeyError, ValueError) as e:
        raise UserError(str(e).strip('"')) from None
    t0 = time.perf_counter()
    n = 0
    per_source: dict[str, int] = {s: 0 for s in sampler.names}
    first: list[int] = []
    for toks, src, _ in _take(sampler, args.count):
        if not first:
            first = toks[:16].tolist()
        per_source[src] += 1
        n += 1
    secs = time.perf_counter() - t0
    if args.state_out:
        write_json(args.state_out, sampler.state_dict(), indent=None)
    tokens = n * (args.seq_len + 1)
    shares = {s: c / n if n else 0.0 for s, c in per_source.items()}
    out = {"sequences": n, "tokens": tokens, "shares": shares, "target": sampler.target_shares(),
           "cumulative_shares": sampler.token_shares(), "exhausted": n < args.count,
           "sequences_per_s": n / max(secs, 1e-9), "first_tokens": first}
    if args.json:
        print_json(out)
    else:
        for s in sampler.names:
            print(f"{s:24s} share {shares[s]:.4f}  target {out['target'][s]:.4f}")
        print(f"{n} sequences of {args.seq_len + 1} tokens ({out['sequences_per_s']:,.0f} seq/s)"
              + ("; a no-repeat source ran out" if out["exhausted"] else ""))
    return 0


def _take(it, count):
    for _ in range(count):
        try:
            yield next(it)
        except StopIteration:
            return


def cmd_build_corpus(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from .corpus import build_corpus

    sources = [s for s in (args.sources or "").split(",") if s] or None
    try:
        manifest = build_corpus(args.out, sources=sources, force=args.force, progress=not args.json)
    except ValueError as e:  # an unknown source name
        raise UserError(str(e)) from None
    if args.json:
        print_json(manifest)
    else:
        for name, m in manifest["sources"].items():
            print(f"{name:24s} {m['category']:10s} {m.get('docs', 0):>7,d} docs {m.get('bytes', 0) / 1e6:8.2f} MB  {m['status']}")
        print(f"total {manifest['total_bytes'] / 1e6:.1f} MB → {args.out}")
    failed = manifest.get("run", {}).get("failed", [])
    if failed:  # the others were built and kept; a re-run retries only these
        print(f"mobilellm-r1 data build-corpus: {len(failed)} source(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="corpus, tokenization and mixture sampling")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    dsub.required = True

    p = dsub.add_parser("tokenize", help="tokenize inputs into token shards (one source per input folder/file stem)")
    p.add_argument("--tokenizer", default="llama3", help="llama3 | smollm2 | PATH to .gguf or tokenizer.json")
    p.add_argument("--input", nargs="+", required=True, help="files, folders or hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = all cores)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-docs", type=int, default=0, help="tokenize only the first N documents of each source")
    p.add_argument("--shard-tokens", type=int, default=1 << 28)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tokenize)

    p = dsub.add_parser("verify", help="check every shard file's size and checksum against index.json")
    p.add_argument("shards", help="token shards folder")
    p.add_argument("--workers", type=int, default=0, help="files hashed at once (0 = all cores)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = dsub.add_parser("sample", help="draw training sequences from shards by mixture weights")
    p.add_argument("--shards", required=True)
    p.add_argument("--weights", default="", help="SOURCE=W,... (default: equal)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--no-repeat", action="store_true", help="stop when a source is exhausted (LOO runs)")
    p.add_argument("--exclude", default="", help="leave these sources out (comma-separated)")
    p.add_argument("--state-in")
    p.add_argument("--state-out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = dsub.add_parser("build-corpus", help="assemble the embedded default corpus from package-shipped text")
    p.add_argument("--out", required=True)
    p.add_argument("--sources", default="", help="only these sources (comma-separated)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_build_corpus)
