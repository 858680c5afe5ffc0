"""Tokenizer and sampler throughput, each printed as a ratio against a baseline measured in this run.

1. Tokenization: ``tokenize_sources`` (parallel workers, shards written to disk) against a plain
   single-process ``tokenizer.encode`` loop over the same documents. Reports tokens/s and tokens/s per
   core.
2. Mixture sampler: sequences/s of ``MixtureSampler`` against the floor cost of reading the same number
   of sequences from the memory-mapped shards at random offsets (what any sampler must pay).

Usage: python benchmarks/tokenize.py [--tokenizer llama3] [--input PATH...] [--mb 20] [--json]
Default input: the CPython standard library sources (real text present on every machine).
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's `tokenize` (which `inspect` imports): drop the script's
# folder from the import path before anything else is imported.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import sysconfig  # noqa: E402
import tempfile
import time
from pathlib import Path

import numpy as np

from mobilellm_r1.data.mixture import MixtureSampler
from mobilellm_r1.data.shards import ShardSet, TokenizeOptions, tokenize_sources
from mobilellm_r1.data.sources import iter_documents
from mobilellm_r1.tokenizer import load_tokenizer


def stdlib_docs(limit_bytes: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts:
            continue
        try:
            t = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if not t.strip():  # the reader counts empty documents as skipped; keep the two runs comparable
            continue
        out.append(t)
        size += len(t.encode())
        if size >= limit_bytes:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="llama3")
    ap.add_argument("--input", nargs="*", help="files/folders to tokenize (default: CPython stdlib)")
    ap.add_argument("--mb", type=float, default=20.0, help="MB of text to use")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    limit = int(args.mb * 1e6)
    if args.input:
        docs, size = [], 0
        for p in args.input:
            for d in iter_documents(p):
                docs.append(d.text)
                size += len(d.text.encode())
                if size >= limit:
                    break
    else:
        docs = stdlib_docs(limit)
    n_bytes = sum(len(d.encode()) for d in docs)
    tok = load_tokenizer(args.tokenizer)

    # -- baseline: one process, one encode call per document --------------------------------------
    t0 = time.perf_counter()
    base_tokens = sum(len(tok.encode(d)) + 2 for d in docs)
    base_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        n_src = 4  # four sources, so the sampler has a mixture to schedule
        for i in range(n_src):
            with (src / f"s{i}.jsonl").open("w") as f:
                for d in docs[i::n_src]:
                    f.write(json.dumps({"text": d}) + "\n")
        inputs = {f"s{i}": [str(src / f"s{i}.jsonl")] for i in range(n_src)}
        t0 = time.perf_counter()
        index = tokenize_sources(inputs, Path(tmp) / "shards",
                                 TokenizeOptions(tokenizer=args.tokenizer, workers=args.workers, progress=False))
        ours_s = time.perf_counter() - t0
        ours_tokens = index["run"]["tokens"]
        assert ours_tokens == base_tokens, (ours_tokens, base_tokens)

        # -- sampler -------------------------------------------------------------------------------
        shards = ShardSet(Path(tmp) / "shards")
        weights = {f"s{i}": w for i, w in enumerate([0.4, 0.3, 0.2, 0.1])}
        seq = min(args.seq_len, min(shards.n_tokens(s) for s in weights) // 4)
        sampler = MixtureSampler(shards, weights, seq_len=seq, seed=0)
        n = args.sequences
        t0 = time.perf_counter()
        for _ in range(n):
            next(sampler)
        samp_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        names = list(weights)
        picks = rng.integers(0, len(names), n)
        t0 = time.perf_counter()
        for i in picks:
            s = names[i]
            start = int(rng.integers(0, shards.n_tokens(s) - seq - 1))
            shards.tokens(s, start, seq + 1).astype(np.int64)
        floor_s = time.perf_counter() - t0

    res = {
        "tokenizer": args.tokenizer, "mb": n_bytes / 1e6, "docs": len(docs), "tokens": base_tokens,
        "baseline_tokens_per_s": base_tokens / base_s,
        "tokens_per_s": ours_tokens / ours_s, "workers": args.workers,
        "tokens_per_s_per_core": ours_tokens / ours_s / args.workers,
        "speedup_vs_single_process_encode": base_s / ours_s,
        "sampler_seq_len": seq, "sampler_sequences_per_s": n / samp_s,
        "sampler_tokens_per_s": n * (seq + 1) / samp_s,
        "random_read_sequences_per_s": n / floor_s,
        "sampler_vs_random_read": floor_s / samp_s,
    }
    if args.json:
        json.dump(res, sys.stdout, indent=2)
        print()
        return
    print(f"text: {res['mb']:.1f} MB, {len(docs)} docs, {base_tokens:,} tokens ({args.tokenizer})")
    print(f"baseline single-process encode: {res['baseline_tokens_per_s']:>12,.0f} tokens/s")
    print(f"data tokenize ({args.workers} workers, to disk): {res['tokens_per_s']:>12,.0f} tokens/s "
          f"= {res['tokens_per_s_per_core']:,.0f} tokens/s per core; ratio vs baseline "
          f"{res['speedup_vs_single_process_encode']:.2f}x")
    print(f"mixture sampler (seq {seq + 1}): {res['sampler_sequences_per_s']:>12,.0f} sequences/s "
          f"({res['sampler_tokens_per_s'] / 1e6:,.1f}M tokens/s); ratio vs raw random reads "
          f"{res['sampler_vs_random_read']:.2f}x")


if __name__ == "__main__":
    main()
