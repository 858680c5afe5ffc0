"""Decode speed: our KV-cache generation against ``transformers`` ``generate`` on the same weights.

Both run in this process on the same random-weight model (140m preset by default): ours directly (after
``Transformer.decode_layout()``, as ``mobilellm-r1 generate`` runs it), HF's ``Llama4ForCausalLM`` loaded
from our HF export. Greedy, batch 1, a fixed prompt, every run producing
exactly ``--new-tokens`` tokens (stop tokens disabled on both sides). Tokens/s is new tokens over the
wall time of the whole call (prefill included), best of ``--repeats`` after a warm-up; the outputs are
checked to be the same tokens.

Usage: python benchmarks/generate.py [--preset 140m] [--prompt-tokens 32] [--new-tokens 128] [--json]

``--workload longtail`` and ``--workload samples`` measure the continuous-batching engine
(``model/engine.py``) against today's static batching (``generate``: batches of ``--slots`` rows, each run
until its longest row ends), same model, same slots, in this process, rounds alternating:

- ``longtail``: ``--requests`` greedy requests whose completion lengths spread ``--spread``-fold
  (log-uniform; a row "ends" at its length, as if it had met its EOS there: the static batch keeps
  decoding it until the batch's longest row ends, then it is cut). Every row's tokens must be identical.
- ``samples``: one prompt, ``--n`` samples at temperature 0.6 (AIME-style pass@1 over n); rows end at
  stop tokens (``--stop-share`` of the vocabulary, so lengths are geometric). Reports how often the prompt
  was prefilled by each side.

Usage: python benchmarks/generate.py --workload longtail [--preset tiny] [--slots 8] [--json]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` (which torch imports through `inspect`):
# drop this script's folder from the import path first.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402


def cpu_name() -> str:
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    name = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")), "unknown")
    return name + (" (avx512_bf16)" if "avx512_bf16" in info else "")


def engine_vs_static(args) -> dict:
    """The ``longtail`` and ``samples`` workloads (module docstring)."""
    import random
    import statistics

    from mobilellm_r1.config import model_preset
    from mobilellm_r1.model import Transformer
    from mobilellm_r1.model.engine import EngineConfig, Request, run
    from mobilellm_r1.model.generate import generate

    torch.manual_seed(0)
    cfg = model_preset(args.preset, vocab_size=args.vocab_size, max_seq_len=1024)
    model = Transformer(cfg).eval()
    model.decode_layout()
    rng = random.Random(args.seed)
    vocab = cfg.vocab_size
    if args.workload == "longtail":
        lo = max(1, args.new_tokens // args.spread)
        lengths = [int(round(lo * args.spread ** rng.random())) for _ in range(args.requests)]
        lengths[0], lengths[-1] = lo, lo * args.spread  # both ends of the spread occur...
        rng.shuffle(lengths)  # ...anywhere in the queue: the longest last would make one row the whole tail
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 64))] for _ in range(args.requests)]
        reqs = [Request(p, n) for p, n in zip(prompts, lengths)]
        # the static batches' widest cache: the same memory for both sides
        ecfg = EngineConfig(slots=args.slots, max_len=max(map(len, prompts)) + max(lengths), stop_token_ids=[])
    else:
        prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)]
        stops = rng.sample(range(3, vocab), max(1, int(vocab * args.stop_share)))
        prompts, lengths = [prompt] * args.n, [args.new_tokens] * args.n
        reqs = [Request(prompt, args.new_tokens, n=args.n)]
        ecfg = EngineConfig(slots=args.slots, max_len=args.prompt_tokens + args.new_tokens, temperature=0.6, top_p=0.95,
                            seed=args.seed, stop_token_ids=stops)

    def static():
        t0 = time.perf_counter()
        rows, prefills, new = [], 0, 0
        for i in range(0, len(prompts), args.slots):
            ps, ls = prompts[i:i + args.slots], lengths[i:i + args.slots]
            r = generate(model, ps, max(ls), temperature=ecfg.temperature, top_p=ecfg.top_p, seed=args.seed + i,
                         stop_token_ids=ecfg.stop_token_ids)
            prefills += len(ps)
            rows += [ids[:n] for ids, n in zip(r.token_ids, ls)]
        new = sum(map(len, rows))
        return rows, new / (time.perf_counter() - t0), prefills

    def continuous():
        res = run(model, reqs, ecfg)
        rows = [c.token_ids for cs in res.completions for c in cs]
        return rows, res.tokens_per_s, res.prefills, res.decode_steps

    continuous(), static()  # warm-up
    ratios, s_tps, c_tps = [], [], []
    for _ in range(args.repeats):
        s_rows, s, s_pre = static()
        c_rows, c, c_pre, c_steps = continuous()
        ratios.append(c / s)
        s_tps.append(s)
        c_tps.append(c)
    out = {"workload": args.workload, "preset": args.preset, "slots": args.slots, "cpu": cpu_name(),
           "threads": torch.get_num_threads(), "ratio_vs_static": round(statistics.median(ratios), 3),
           "ratios": [round(r, 3) for r in ratios], "tokens_per_s": round(statistics.median(c_tps), 1),
           "static_tokens_per_s": round(statistics.median(s_tps), 1),
           "cache_positions": {"static": args.slots * (max(map(len, prompts)) + max(lengths)),
                               "engine": ecfg.slots * ecfg.max_len}}
    lens = sorted(map(len, c_rows))
    out["completion_lengths"] = {"min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1]}
    if args.workload == "longtail":
        out["requests"] = len(reqs)
        # decode steps: static runs each batch to its longest row; their ratio bounds the speed-up when a step
        # costs the same with fewer live rows
        static_steps = sum(max(lengths[i:i + args.slots]) for i in range(0, len(lengths), args.slots))
        out["decode_steps"] = {"static": static_steps, "engine": c_steps}
        out["step_ratio"] = round(static_steps / c_steps, 3)
        out["identical_greedy_tokens"] = s_rows == c_rows
    else:
        out["n"] = args.n
        out["prefills"] = {"static": s_pre, "engine": c_pre}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["hf", "longtail", "samples"], default="hf",
                    help="hf: ours vs transformers generate; longtail/samples: the engine vs static batching")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--requests", type=int, default=128, help="longtail: prompts (16 per slot by default)")
    ap.add_argument("--spread", type=int, default=64,
                    help="longtail: longest / shortest completion (reasoning traces spread ~100-fold)")
    ap.add_argument("--n", type=int, default=16, help="samples: samples of the one prompt")
    ap.add_argument("--stop-share", type=float, default=0.01, help="samples: share of the vocabulary that stops")
    ap.add_argument("--vocab-size", type=int, default=8192, help="longtail/samples: the model's vocabulary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default=None, help="default: 140m for hf, tiny for longtail/samples")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-decode-layout", action="store_true",
                    help="keep our weights row-major (skip Transformer.decode_layout)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workload != "hf":
        args.preset = args.preset or "tiny"
        if args.new_tokens == 128:  # the hf workload's default: longer completions here
            args.new_tokens = 512
        if args.workload == "samples" and args.prompt_tokens == 32:
            args.prompt_tokens = 160
        res = engine_vs_static(args)
        if args.json:
            print(json.dumps(res))
        else:
            print(f"{res['workload']}: {res['preset']}, {res['slots']} slots, {res['threads']} threads, {res['cpu']}")
            for k, v in res.items():
                if k not in ("workload", "preset", "slots", "threads", "cpu"):
                    print(f"  {k}: {v}")
        return
    args.preset = args.preset or "140m"
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from mobilellm_r1.config import model_preset
    from mobilellm_r1.model import Transformer
    from mobilellm_r1.model.generate import generate
    from mobilellm_r1.model.hf import export_hf

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = model_preset(args.preset)
    ours = Transformer(cfg).eval()
    prompt = torch.randint(0, 128000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory() as d:
        export_hf(ours, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    if not args.no_decode_layout:
        ours.decode_layout()

    def run_ours():
        r = generate(ours, [prompt], args.new_tokens, stop_token_ids=[])
        return r.token_ids[0]

    hf_ids = torch.tensor([prompt])

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        return out[0, len(prompt):].tolist()

    def best(fn):
        toks = fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            toks = fn()
            times.append(time.perf_counter() - t)
        return len(toks) / min(times), toks

    ours_tps, ours_toks = best(run_ours)
    hf_tps, hf_toks = best(run_hf)
    same = sum(a == b for a, b in zip(ours_toks, hf_toks))
    res = {
        "preset": args.preset, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(), "ours_tokens_per_s": round(ours_tps, 2),
        "hf_tokens_per_s": round(hf_tps, 2), "ratio": round(ours_tps / hf_tps, 3),
        "same_tokens": f"{same}/{len(ours_toks)}",
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.preset}: prompt {args.prompt_tokens}, {args.new_tokens} new tokens, greedy, batch 1, "
              f"{res['threads']} threads")
        print(f"ours          {ours_tps:8.2f} tokens/s")
        print(f"transformers  {hf_tps:8.2f} tokens/s")
        print(f"ratio (ours/HF) {res['ratio']:.3f}   identical tokens {res['same_tokens']}")


if __name__ == "__main__":
    main()
