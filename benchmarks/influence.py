"""Influence scoring speed: our batched scorer against a naive per-sample ``loss.backward()`` loop and against
a plain training step, on the same model and the same real text (CPU).

- ours: :func:`mobilellm_r1.influence.scores.score_model` (exact path: one batched backward per batch, dot
  products with the probe mean gradient from the hooked factors; or ``--proj-dim`` features);
- naive: per sample, ``zero_grad`` + forward + ``loss.backward()`` + flatten every ``.grad`` + dot with the
  flattened probe mean gradient (the textbook TracIn loop);
- train step: forward + backward + AdamW step over a batch of the same size (samples/s).

Fidelity measured in the same run: Spearman of ours (exact) against the naive scores, and of the
projected scorer (``--check-proj-dim``, default 8192) against the naive scores.

Usage: python benchmarks/influence.py [--preset tiny] [--seq-len 256] [--samples 16] [--batch 8] [--json]
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/tokenize.py would shadow the standard library's tokenize

import argparse  # noqa: E402
import json  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--proj-dim", type=int, default=0, help="scorer path timed (0 = exact)")
    ap.add_argument("--check-proj-dim", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    from mobilellm_r1.config import model_preset
    from mobilellm_r1.influence.features import pad_rows
    from mobilellm_r1.influence.scores import InfluenceConfig, Sample, score_model, spearman
    from mobilellm_r1.model.transformer import Transformer
    from mobilellm_r1.tokenizer import load_tokenizer
    from mobilellm_r1.train.objectives import IGNORE, head_loss

    tok = load_tokenizer("smollm2")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [f.read_text(errors="ignore")[:20000] for f in sorted(stdlib.glob("*.py"))[: args.samples + 8]]
    rows = [r[: args.seq_len + 1] for r in tok.encode_batch(texts, bos=True, eos=True) if len(r) > args.seq_len]
    train, probe = rows[: args.samples], rows[args.samples: args.samples + 8]
    torch.manual_seed(0)
    model = Transformer(model_preset(args.preset, vocab_size=tok.vocab_size))
    samples = [Sample("stdlib", i, r) for i, r in enumerate(train)]
    cfg = InfluenceConfig(seq_len=args.seq_len, batch_size=args.batch, proj_dim=args.proj_dim)

    # --- ours ---------------------------------------------------------------------------------------
    score_model(model, samples[: args.batch], {"code": probe}, cfg)  # warm-up
    t0 = time.perf_counter()
    ours = score_model(model, samples, {"code": probe}, cfg)[:, 0]
    ours_s = time.perf_counter() - t0

    # --- naive ----------------------------------------------------------------------------------------
    params = [p for p in model.parameters()]

    def sample_grad(r: list[int]) -> torch.Tensor:
        inp, tgt = pad_rows([r], args.seq_len)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inp)[0], tgt[0], ignore_index=IGNORE).backward()
        return torch.cat([p.grad.flatten() for p in params])

    t0 = time.perf_counter()  # both sides pay for the probe gradient
    q = torch.stack([sample_grad(r) for r in probe]).mean(0)
    naive = np.array([float(sample_grad(r) @ q) for r in train])
    naive_s = time.perf_counter() - t0

    # --- a plain training step --------------------------------------------------------------------------
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    inp, tgt = pad_rows(train[: args.batch], args.seq_len)

    def step():
        parts = head_loss(model(inp, return_hidden=True), model.head_weight, tgt)
        (parts.loss / parts.tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    reps = max(1, args.samples // args.batch)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    train_s = (time.perf_counter() - t0) / (reps * args.batch)

    pcfg = InfluenceConfig(seq_len=args.seq_len, batch_size=args.batch, proj_dim=args.check_proj_dim)
    proj = score_model(model, samples, {"code": probe}, pcfg)[:, 0]
    res = {
        "speedup_vs_naive": (naive_s / args.samples) / (ours_s / args.samples),
        "vs_train_step": (args.samples / ours_s) / (1 / train_s),
        "spearman_vs_exact": spearman(ours, naive),
        "spearman_projected": spearman(proj, naive),
        "ours_samples_per_s": args.samples / ours_s, "naive_samples_per_s": args.samples / naive_s,
        "train_samples_per_s": 1 / train_s, "preset": args.preset, "seq_len": args.seq_len,
        "samples": args.samples, "batch": args.batch, "proj_dim": args.proj_dim,
        "check_proj_dim": args.check_proj_dim, "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps({k: res[k] for k in ("speedup_vs_naive", "vs_train_step", "spearman_vs_exact",
                                              "spearman_projected")} | {"details": res}, indent=2))
        return
    print(f"influence scoring, {args.preset} preset, seq {args.seq_len}, {args.samples} samples, batch {args.batch}, "
          f"{res['threads']} threads")
    print(f"  ours ({'exact' if not args.proj_dim else f'proj {args.proj_dim}'}) {res['ours_samples_per_s']:8.2f} samples/s")
    print(f"  naive per-sample backward      {res['naive_samples_per_s']:8.2f} samples/s  -> speed-up {res['speedup_vs_naive']:.2f}x")
    print(f"  plain training step            {res['train_samples_per_s']:8.2f} samples/s  -> ours/train {res['vs_train_step']:.2f}x")
    print(f"  Spearman vs naive: exact {res['spearman_vs_exact']:.4f}, projected ({args.check_proj_dim}) "
          f"{res['spearman_projected']:.4f}")


if __name__ == "__main__":
    main()
