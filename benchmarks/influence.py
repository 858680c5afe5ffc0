"""Influence scoring speed: our batched scorer against naive per-sample ``loss.backward()`` loops and against
a plain training step, on the same model and the same real text (CPU), with a FLOP/time breakdown.

Scored: ``--samples`` windows of CPython standard-library source against ``--caps`` probe sets (the pipeline
scores 3 capabilities), one checkpoint, identity preconditioner.

- ours exact: :func:`mobilellm_r1.influence.scores.score_model`, ``proj_dim = 0`` (one batched forward +
  backward to the activations per batch; per-sample head/linear gradients from the hooked factors, dotted
  with every capability's probe mean gradient);
- ours projected: the same with ``--check-proj-dim`` (default 8192) TensorSketch features;
- naive exact (what a naive user writes): per sample, ``zero_grad`` + forward + ``F.cross_entropy`` +
  ``loss.backward()`` + flatten every ``.grad`` + one dot per capability; the probe mean gradients the same
  way (per-sample backward, averaged);
- naive projected: naive exact's flattened gradients, projected to ``--check-proj-dim`` dims by a dense
  seeded Gaussian matrix generated block by block (it does not fit in memory: 8192 x params floats), as
  TRAK's CPU ``BasicProjector`` does; then dot in projected space. The projection is timed on
  ``--naive-proj-params`` parameters and scaled linearly to all of them (its cost is exactly linear in the
  parameter count: one generated block and one matmul per block) -- reported as an extrapolation;
- train step: forward + backward + AdamW step over a batch of ``--batch`` samples (samples/s).

Timings of the scorers exclude the probe gradients (a one-off per checkpoint, amortised over every scored
sample: the pipeline scores many more samples than probes); ``*_with_probes`` include them for this run.

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


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--caps", type=int, default=3, help="capabilities (probe sets) scored")
    ap.add_argument("--probes", type=int, default=4, help="probe documents per capability")
    ap.add_argument("--check-proj-dim", type=int, default=8192)
    ap.add_argument("--naive-proj-params", type=int, default=1 << 19,
                    help="parameters the naive dense projection is timed on (scaled linearly to all)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    from mobilellm_r1.config import model_preset
    from mobilellm_r1.influence.features import GradientFeaturizer, pad_rows
    from mobilellm_r1.influence.scores import InfluenceConfig, Sample, score_model, spearman
    from mobilellm_r1.model.transformer import Transformer
    from mobilellm_r1.tokenizer import load_tokenizer
    from mobilellm_r1.train.objectives import IGNORE, head_loss

    tok = load_tokenizer("smollm2")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    n_probe = args.caps * args.probes
    texts = [f.read_text(errors="ignore")[:20000] for f in sorted(stdlib.glob("*.py"))[: args.samples + n_probe + 8]]
    rows = [r[: args.seq_len + 1] for r in tok.encode_batch(texts, bos=True, eos=True) if len(r) > args.seq_len]
    train, probe_rows = rows[: args.samples], rows[args.samples: args.samples + n_probe]
    probes = {f"cap{c}": probe_rows[c * args.probes: (c + 1) * args.probes] for c in range(args.caps)}
    torch.manual_seed(0)
    model = Transformer(model_preset(args.preset, vocab_size=tok.vocab_size))
    samples = [Sample("stdlib", i, r) for i, r in enumerate(train)]
    cfg = InfluenceConfig(seq_len=args.seq_len, batch_size=args.batch)
    n_params = sum(p.numel() for p in model.parameters())

    # --- ours: probe gradients (timed apart), then scoring ---------------------------------------------------
    score_model(model, samples[: args.batch], probes, cfg)  # warm-up
    f = GradientFeaturizer(model)
    batches = {c: [pad_rows(r, args.seq_len)] for c, r in probes.items()}
    qs, ours_probe_s = _timed(lambda: [f.mean_gradient(b) for b in batches.values()])
    inputs = [pad_rows(train[i: i + args.batch], args.seq_len) for i in range(0, len(train), args.batch)]
    ours, ours_s = _timed(lambda: np.concatenate([f.dots(i, t, qs)[0].numpy() for i, t in inputs]))
    pcfg = InfluenceConfig(seq_len=args.seq_len, batch_size=args.batch, proj_dim=args.check_proj_dim)
    proj, proj_total_s = _timed(lambda: score_model(model, samples, probes, pcfg))
    fp = GradientFeaturizer(model, proj_dim=args.check_proj_dim, calibrate=batches["cap0"][0])
    _, proj_feat_s = _timed(lambda: [fp.features(i, t) for i, t in inputs])

    # --- breakdown: a no-grad forward, and the head alone ----------------------------------------------------
    with torch.no_grad():
        inp0, tgt0 = inputs[0]
        hid, fwd_blocks_s = _timed(lambda: model(inp0, return_hidden=True))
        _, fwd_head_s = _timed(lambda: head_loss(hid, model.head_weight, tgt0))
    per_b = len(inputs)
    V, d = model.head_weight.shape
    block_params = n_params - V * d
    toks = args.samples * args.seq_len
    flops = {"fwd_head_per_token": 2 * V * d, "fwd_blocks_per_token": 2 * block_params,
             "head_share_of_forward": V * d / (V * d + block_params)}

    # --- naive ---------------------------------------------------------------------------------------------
    params = list(model.parameters())

    def sample_grad(r: list[int]) -> torch.Tensor:
        inp, tgt = pad_rows([r], args.seq_len)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inp)[0], tgt[0], ignore_index=IGNORE).backward()
        return torch.cat([p.grad.flatten() for p in params])

    q_naive, naive_probe_s = _timed(lambda: [torch.stack([sample_grad(r) for r in rs]).mean(0) for rs in probes.values()])
    q_naive = torch.stack(q_naive)  # (C, P)
    grads = []

    def naive_scores():
        out = []
        for r in train:
            g = sample_grad(r)
            grads.append(g)
            out.append((q_naive @ g).numpy())
        return np.stack(out)

    naive, naive_s = _timed(naive_scores)
    # dense projection of the flattened gradients (and the probe gradients), timed on a slice of parameters
    k = min(args.naive_proj_params, n_params)
    G = torch.stack(grads)[:, :k]
    gen = torch.Generator().manual_seed(0)

    def dense_project():
        blk = 1 << 14
        out = torch.zeros(G.shape[0] + args.caps, args.check_proj_dim)
        for i in range(0, k, blk):
            P = torch.randn(min(blk, k - i), args.check_proj_dim, generator=gen) / args.check_proj_dim ** 0.5
            out += torch.cat([G[:, i:i + blk], q_naive[:, i:i + blk]]) @ P
        return out

    _, proj_slice_s = _timed(dense_project)
    naive_proj_s = naive_s + proj_slice_s * n_params / k

    # --- a plain training step --------------------------------------------------------------------------------
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    inp, tgt = inputs[0]

    def step():
        parts = head_loss(model(inp, return_hidden=True), model.head_weight, tgt)
        (parts.loss / parts.tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    reps = max(1, args.samples // args.batch)
    _, t = _timed(lambda: [step() for _ in range(reps)])
    train_sps = reps * args.batch / t

    ours_sps, naive_sps = args.samples / ours_s, args.samples / naive_s
    proj_sps, naive_proj_sps = args.samples / proj_feat_s, args.samples / naive_proj_s
    res = {
        "speedup_vs_naive": ours_sps / naive_sps,
        "vs_train_step": ours_sps / train_sps,
        "spearman_vs_exact": float(np.mean([spearman(ours[:, c], naive[:, c]) for c in range(args.caps)])),
        "spearman_projected": float(np.mean([spearman(proj[:, c], naive[:, c]) for c in range(args.caps)])),
        "speedup_vs_naive_projected": proj_sps / naive_proj_sps,
        "projected_vs_train_step": proj_sps / train_sps,
        "speedup_vs_naive_with_probes": (naive_s + naive_probe_s) / (ours_s + ours_probe_s),
        "ours_samples_per_s": ours_sps, "naive_samples_per_s": naive_sps, "train_samples_per_s": train_sps,
        "ours_projected_samples_per_s": proj_sps, "naive_projected_samples_per_s_extrapolated": naive_proj_sps,
        "ours_projected_total_s_with_probes": proj_total_s,
        "probe_gradients_s": {"ours": ours_probe_s, "naive": naive_probe_s},
        "naive_projection_timed_params": k, "naive_projection_slice_s": proj_slice_s,
        "breakdown_s_per_batch": {"fwd_blocks": fwd_blocks_s, "fwd_head": fwd_head_s,
                                  "ours_exact_total": ours_s / per_b, "ours_projected_total": proj_feat_s / per_b,
                                  "train_step": args.batch / train_sps},
        "flops": flops, "tokens_scored": toks, "params": n_params,
        "preset": args.preset, "seq_len": args.seq_len, "samples": args.samples, "batch": args.batch,
        "caps": args.caps, "check_proj_dim": args.check_proj_dim, "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps({k: res[k] for k in ("speedup_vs_naive", "vs_train_step", "spearman_vs_exact",
                                              "spearman_projected")} | {"details": res}, indent=2))
        return
    b = res["breakdown_s_per_batch"]
    print(f"influence scoring, {args.preset} preset ({n_params / 1e6:.1f}M params, head {flops['head_share_of_forward']:.0%} "
          f"of forward FLOPs), seq {args.seq_len}, {args.samples} samples x {args.caps} capabilities, "
          f"batch {args.batch}, {res['threads']} threads")
    print(f"  ours exact                       {ours_sps:8.2f} samples/s")
    print(f"  naive per-sample backward + dots {naive_sps:8.2f} samples/s  -> speed-up {res['speedup_vs_naive']:.2f}x")
    print(f"  ours projected ({args.check_proj_dim})          {proj_sps:8.2f} samples/s")
    print(f"  naive + dense projection (extr.) {naive_proj_sps:8.3f} samples/s  -> speed-up "
          f"{res['speedup_vs_naive_projected']:.1f}x")
    print(f"  plain training step              {train_sps:8.2f} samples/s  -> exact/train {res['vs_train_step']:.2f}x, "
          f"projected/train {res['projected_vs_train_step']:.2f}x")
    print(f"  per batch: forward blocks {b['fwd_blocks']:.2f}s + head {b['fwd_head']:.2f}s; ours exact "
          f"{b['ours_exact_total']:.2f}s, projected {b['ours_projected_total']:.2f}s, train step {b['train_step']:.2f}s")
    print(f"  Spearman vs naive: exact {res['spearman_vs_exact']:.4f}, projected {res['spearman_projected']:.4f}")


if __name__ == "__main__":
    main()
