"""CPU training step time: bf16 autocast against fp32, and the SFT head skip against the full head.

One process, one model (``--preset``, SmolLM2's 49,152-id vocabulary), the same batches: a pre-training-
shaped step (every token a target) and an SFT-shaped step (``--target-share`` of tokens are targets, the
rest are prompt/padding). Each configuration is timed over ``--steps`` optimizer steps after two warm-up
steps (median), and the script prints the ratios against fp32 / the full head, plus what ``--dtype fast``
decides on this CPU (``train.metrics.use_bf16_autocast``) and the matmul speed-up it is based on.
Say which CPU a figure came from: ``grep -m1 flags /proc/cpuinfo`` (``avx512_bf16`` / ``amx_bf16``).

Usage: python benchmarks/cpu_precision.py [--preset tiny] [--micro-batch 4] [--seq-len 256] [--steps 6] [--json]
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/tokenize.py would shadow the standard library's tokenize

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def step_time(model, opt, x, y, doc, bf16: bool, steps: int) -> float:
    from mobilellm_r1.train.objectives import IGNORE, head_loss

    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = model(x, doc_ids=doc, return_hidden=True)
            loss = head_loss(h, model.head_weight, y).loss / max(int((y != IGNORE).sum()), 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--target-share", type=float, default=0.25, help="SFT-shaped step: share of target tokens")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    from mobilellm_r1.config import model_preset
    from mobilellm_r1.model.transformer import Transformer
    from mobilellm_r1.train.metrics import cpu_bf16_speedup, use_bf16_autocast
    from mobilellm_r1.train.objectives import IGNORE

    torch.manual_seed(0)
    cfg = model_preset(a.preset, vocab_size=49152, bos_id=0, eos_ids=[0, 2], pad_id=2)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq_len), generator=g)
    y_all = torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq_len), generator=g)
    y_sft = y_all.clone()
    y_sft[torch.rand(y_sft.shape, generator=g) >= a.target_share] = IGNORE
    doc = (torch.arange(a.seq_len) // 128).expand(a.micro_batch, -1).contiguous()  # two packed documents a row
    tokens = a.micro_batch * a.seq_len
    rows = {}
    for shape, y in (("pretrain", y_all), ("sft", y_sft)):
        for bf16 in (False, True):
            rows[f"{shape}_{'bf16' if bf16 else 'fp32'}"] = step_time(model, opt, x, y, doc, bf16, a.steps)
    speedup = cpu_bf16_speedup()
    res = {"preset": a.preset, "tokens_per_step": tokens, "threads": torch.get_num_threads(),
           "step_s": rows, "tokens_per_s": {k: tokens / v for k, v in rows.items()},
           "bf16_over_fp32": {s: rows[f"{s}_fp32"] / rows[f"{s}_bf16"] for s in ("pretrain", "sft")},
           "sft_over_pretrain_step": {d: rows[f"pretrain_{d}"] / rows[f"sft_{d}"] for d in ("fp32", "bf16")},
           "bf16_matmul_speedup": speedup, "fast_dtype_uses_bf16": use_bf16_autocast("fast", torch.device("cpu"))}
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    for k, v in rows.items():
        print(f"{k:14s} {v * 1e3:8.1f} ms/step  {tokens / v:8.0f} tokens/s")
    print(f"bf16 autocast / fp32: {res['bf16_over_fp32']['pretrain']:.2f}x (pre-training step), "
          f"{res['bf16_over_fp32']['sft']:.2f}x (SFT step)")
    print(f"SFT step ({a.target_share:.0%} targets, head skipped elsewhere) / pre-training step: "
          f"{res['sft_over_pretrain_step']['fp32']:.2f}x fp32, {res['sft_over_pretrain_step']['bf16']:.2f}x bf16")
    print(f"bf16 matmul speed-up {speedup:.2f}x -> --dtype fast uses {'bf16' if res['fast_dtype_uses_bf16'] else 'fp32'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
