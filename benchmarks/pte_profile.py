"""Where a `.pte`'s decode time goes: ExecuTorch's ETDump per op family (issue 19's account).

Loads an exported `.pte` with the event tracer on, prefills a random prompt of ``--context - --new-tokens``
tokens in the file's chunks, decodes ``--new-tokens`` greedy tokens, and splits the decode steps' time
(``Method::execute``) into op families: attention (``llama::custom_sdpa``, a portable op outside XNNPACK),
the 8da4w linears (XNNPACK's QDU8/QB4W GEMMs, the LM head among them), fp32 GEMMs, the KV-cache update,
the 4-bit embedding and the rest. Prints ms per token and each family's share, and the bytes each family
must read per token over its time (achieved bandwidth), beside a streaming-read bandwidth measured in this
process.

Usage: python benchmarks/pte_profile.py model.pte [--context 1024] [--new-tokens 32] [--threads 1] [--json]
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/tokenize.py shadows the standard library's tokenize

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402


def family(name: str) -> str | None:
    if name == "Method::execute":
        return "total"
    if name in ("OPERATOR_CALL", "DELEGATE_CALL", "Program::load_method", "Method::init"):
        return None  # wrappers around the ops counted below
    if "custom_sdpa" in name:
        return "attention"
    if "QB4W" in name:
        return "linear_8da4w"
    if "F32) GEMM" in name:
        return "linear_fp32"
    if "update_cache" in name:
        return "kv_update"
    if "embedding" in name:
        return "embedding"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    from mobilellm_r1.config import ModelConfig, build
    from mobilellm_r1.deploy.bench import kv_bytes_per_position, measure_bandwidth, weight_bytes_per_token
    from mobilellm_r1.deploy.export import load_runtime, sidecar

    load_runtime()
    torch.set_num_threads(1)
    portable_lib._unsafe_reset_threadpool(args.threads)
    meta = json.loads(sidecar(args.pte).read_text())
    cfg = build(ModelConfig, meta["model"], str(sidecar(args.pte)))
    chunk = int(meta.get("prefill_chunk", 1))
    if args.context > int(meta["max_context"]) or args.new_tokens >= args.context:
        raise SystemExit(f"--context must be <= the file's {meta['max_context']} and > --new-tokens")
    m = portable_lib._load_for_executorch(str(args.pte), enable_etdump=True)
    n_prompt = args.context - args.new_tokens
    prompt = torch.randint(0, cfg.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    prefill_runs = 0
    for i in range(0, n_prompt, chunk):
        out = m.forward([torch.tensor([prompt[i:i + chunk]]), torch.tensor([i])])[0]
        prefill_runs += 1
    t = int(out.reshape(-1, out.shape[-1])[-1].argmax())
    t0 = time.perf_counter()
    for k in range(args.new_tokens):
        out = m.forward([torch.tensor([[t]]), torch.tensor([n_prompt + k])])[0]
        t = int(out.reshape(-1, out.shape[-1])[-1].argmax())
    wall = time.perf_counter() - t0
    runs = prefill_runs + args.new_tokens
    with tempfile.TemporaryDirectory() as d:
        m.write_etdump_result_to_file(os.path.join(d, "e.etdp"), os.path.join(d, "e.dbg"))
        ins = Inspector(etdump_path=os.path.join(d, "e.etdp"))
    ms: dict[str, float] = collections.defaultdict(float)
    for block in ins.event_blocks:
        for ev in block.events:
            raw = list(ev.perf_data.raw) if ev.perf_data is not None else []
            fam = family(ev.name)
            if fam is None or not raw or len(raw) % runs:
                continue
            per_run = len(raw) // runs
            ms[fam] += sum(raw[per_run * prefill_runs:]) / args.new_tokens  # decode runs only
    total = ms.pop("total")
    bw = measure_bandwidth(args.threads)
    need = {"attention": args.context * kv_bytes_per_position(cfg),  # the fp32 cache of the whole context
            "linear_8da4w": weight_bytes_per_token(cfg, True, (meta.get("quantization") or {}).get("group_size", 0))}
    res = {"pte": str(args.pte), "context": args.context, "threads": args.threads,
           "decode_tok_s": args.new_tokens / wall, "ms_per_token": total, "bandwidth_GBps": bw / 1e9,
           "families": {f: {"ms_per_token": v, "share": v / total,
                            **({"achieved_GBps": need[f] / (v / 1e3) / 1e9,
                                "roofline_fraction": need[f] / (v / 1e3) / bw} if f in need and v > 0 else {})}
                        for f, v in sorted(ms.items(), key=lambda kv: -kv[1])}}
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{args.pte}: {res['decode_tok_s']:.1f} tokens/s at {args.context} context, {args.threads} thread(s); "
          f"{total:.3f} ms/token in Method::execute; streaming read {bw / 1e9:.1f} GB/s")
    for f, v in res["families"].items():
        extra = f", {v['achieved_GBps']:.1f} GB/s = {v['roofline_fraction']:.0%} of the read bandwidth" \
            if "achieved_GBps" in v else ""
        print(f"  {f:14s} {v['ms_per_token']:.3f} ms/token ({v['share']:.0%}){extra}")


if __name__ == "__main__":
    main()
