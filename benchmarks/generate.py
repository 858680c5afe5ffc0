"""Decode speed: our KV-cache generation against ``transformers`` ``generate`` on the same weights.

Both run in this process on the same random-weight model (140m preset by default): ours directly (after
``Transformer.decode_layout()``, as ``mobilellm-r1 generate`` runs it), HF's ``Llama4ForCausalLM`` loaded
from our HF export. Greedy, batch 1, a fixed prompt, every run producing
exactly ``--new-tokens`` tokens (stop tokens disabled on both sides). Tokens/s is new tokens over the
wall time of the whole call (prefill included), best of ``--repeats`` after a warm-up; the outputs are
checked to be the same tokens.

Usage: python benchmarks/generate.py [--preset 140m] [--prompt-tokens 32] [--new-tokens 128] [--json]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="140m")
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
