"""On-device decode: the exported 8da4w ExecuTorch/XNNPACK program vs our fp32 decoding and llama.cpp
(paper Table 10).

A random-init model of ``--preset`` (140m by default; speed and size do not depend on the weights) is
exported with the paper's scheme and a static KV cache of the largest context, then every runtime decodes
in its own process at each context (``mobilellm_r1.deploy.bench``). Prints the Markdown table, or with
``--json`` ``{"speedup_vs_fp32", "roofline_fraction", "size_ratio", "table", ...}``: the speedup is the
quantized runtime's decode tokens/s over the faster of our two fp32 runtimes at the first context (1k by
default; ``speedup_vs_eager`` against plain eager), the roofline fraction is the quantized runtime's there,
and the size ratio is the ``.pte`` over the fp32 weights. The same checkpoint is also written as a q4_0
GGUF and run by llama.cpp (the ``deploy`` extra's cyllama bindings; without them that row is "skipped"):
``ttft_s`` holds every runtime's time to first token per context, ``ttft_ratio_vs_llamacpp`` and
``decode_ratio_vs_llamacpp`` compare the ``.pte`` with llama.cpp at the first context (ttft: lower is
better; decode: higher is better).

Usage: python benchmarks/deploy.py [--preset 140m] [--contexts 1024,2048,4096] [--threads 1] [--json]
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/tokenize.py shadows the standard library's tokenize

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="140m")
    ap.add_argument("--contexts", default="1024,2048,4096")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="decode rounds per context (median reported)")
    ap.add_argument("--fill", choices=["prefill", "synthetic"], default="prefill")
    ap.add_argument("--keep", help="directory to keep the checkpoint and .pte in")
    ap.add_argument("--llama-bench", help="a llama-bench binary of llama.cpp built for this CPU: adds that row")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    from mobilellm_r1.config import model_preset
    from mobilellm_r1.deploy import DeployConfig
    from mobilellm_r1.deploy.bench import LLAMACPP, bench, wants_gguf
    from mobilellm_r1.deploy.cli import _bench_gguf
    from mobilellm_r1.deploy.export import export_executorch
    from mobilellm_r1.model import Transformer
    from mobilellm_r1.model.io import save_model

    contexts = [int(c) for c in args.contexts.split(",")]
    cfg = DeployConfig(contexts=contexts, threads=args.threads, new_tokens=args.new_tokens, fill=args.fill,
                       rounds=args.rounds, llama_bench=args.llama_bench or "")
    if args.llama_bench:
        cfg.runtimes.append("llamacpp_native")
    with tempfile.TemporaryDirectory() as tmp:
        d = args.keep or tmp
        torch.manual_seed(0)
        mcfg = model_preset(args.preset)
        if max(contexts) > mcfg.max_seq_len:
            mcfg = model_preset(args.preset, max_seq_len=max(contexts))
        model = Transformer(mcfg)
        save_model(os.path.join(d, "ckpt"), model)
        t = time.perf_counter()
        exp = export_executorch(model, os.path.join(d, "model-8da4w.pte"), max(contexts), source=os.path.join(d, "ckpt"))
        export_s = time.perf_counter() - t
        gguf = (_bench_gguf(os.path.join(d, "ckpt"), os.path.join(d, "model-q4_0.gguf"))
                if wants_gguf(cfg.runtimes) else None)
        res = bench(os.path.join(d, "ckpt"), os.path.join(d, "model-8da4w.pte"), cfg, gguf=gguf)
    rows = {rt: r["rows"][0] for rt, r in res["runtimes"].items()}
    q = rows["executorch_8da4w"]
    fp = max((rows[k] for k in ("eager_fp32", "generator_fp32") if rows[k].get("status") == "ok"),
             key=lambda r: r["decode_tok_s"])
    out = {
        "speedup_vs_fp32": q["decode_tok_s"] / fp["decode_tok_s"],
        "speedup_vs_eager": q["decode_tok_s"] / rows["eager_fp32"]["decode_tok_s"],
        "roofline_fraction": q["roofline_fraction"],
        "size_ratio": exp["size_ratio"],
        "pte_bytes": exp["bytes"], "fp32_bytes": exp["fp32_bytes"], "export_s": export_s,
        "export_phases_s": exp["export_seconds"], "delegates": exp["delegates"],
        "context": contexts[0], "bandwidth_GBps": (res["bandwidth"] or 0) / 1e9,
        "table": res["table"], "results": res,
        "ttft_s": {rt: {r["context"]: r.get("ttft_s") for r in v["rows"]} for rt, v in res["runtimes"].items()},
    }
    for rt, tag in ((LLAMACPP, "llamacpp"), ("llamacpp_native", "llamacpp_native")):
        lc = rows.get(rt, {})
        if lc.get("status") == "ok":
            out[f"ttft_ratio_vs_{tag}"] = q["ttft_s"] / lc["ttft_s"]
            out[f"decode_ratio_vs_{tag}"] = q["decode_tok_s"] / lc["decode_tok_s"]
        elif rt in cfg.runtimes:
            out[tag] = lc.get("status", "not run")
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(res["table"])
        print(f"at {contexts[0]} context: {out['speedup_vs_fp32']:.2f}x our fastest fp32 decode "
              f"({out['speedup_vs_eager']:.2f}x eager), {out['roofline_fraction']:.0%} of the bandwidth roofline; "
              f".pte {exp['bytes'] / 1e6:.1f} MB = {exp['size_ratio']:.1%} of fp32")
        for tag in ("llamacpp", "llamacpp_native"):
            if f"ttft_ratio_vs_{tag}" in out:
                print(f"vs {tag} (q4_0): time to first token {out[f'ttft_ratio_vs_{tag}']:.2f}x, "
                      f"decode {out[f'decode_ratio_vs_{tag}']:.2f}x")
            elif tag in out:
                print(f"{tag}: {out[tag]}")


if __name__ == "__main__":
    main()
