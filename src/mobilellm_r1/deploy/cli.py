"""`mobilellm-r1 quantize`, `mobilellm-r1 export`, `mobilellm-r1 bench` (paper section 8)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .config import GGUF_DTYPES


def _deploy_config(args: argparse.Namespace):
    from ..config import load_recipe
    from .config import DeployConfig

    return load_recipe(args.recipe).section("deploy", DeployConfig) if getattr(args, "recipe", None) else DeployConfig()


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    from .quantize import quiet_torchao

    quiet_torchao()


def _load(ckpt: str):
    from ..cli import UserError
    from ..model.io import CheckpointError, load_model
    from .quantize import is_quantized_dir, load_quantized

    try:
        return load_quantized(ckpt) if is_quantized_dir(ckpt) else load_model(ckpt)
    except CheckpointError as e:
        raise UserError(str(e)) from None


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from ..model.io import resolve_tokenizer_spec
    from .quantize import GroupSizeError, quantize_model, save_quantized

    _quiet()
    cfg = _deploy_config(args)
    model, meta = _load(args.checkpoint)
    if "quantization" in meta:
        raise UserError(f"{args.checkpoint} is already quantized")
    try:
        summary = quantize_model(model, args.group_size if args.group_size is not None else cfg.group_size,
                                 cfg.embedding_group_size, cfg.embedding_bits, args.scheme or cfg.scheme)
    except (GroupSizeError, ValueError) as e:
        raise UserError(str(e)) from None
    summary["source"] = str(Path(args.checkpoint).absolute())  # the fp32 model, for `bench` of an export
    save_quantized(args.out, model, summary, resolve_tokenizer_spec(args.checkpoint, meta.get("tokenizer") or ""))
    res = {"out": str(args.out), **summary}
    if args.eval_shards:
        from .stage import perplexity_ratio

        res["accuracy"] = perplexity_ratio(args.checkpoint, args.out, args.eval_shards, seq_len=args.seq_len,
                                           max_tokens=args.max_tokens)
    if args.json:
        print_json(res)
    else:
        print(f"quantized {args.checkpoint} ({summary['scheme']}, group {summary['group_size']}, embedding "
              f"{summary['embedding_bits']}-bit group {summary['embedding_group_size']}) -> {args.out}; "
              f"weights {summary['quantized_bytes'] / 1e6:.1f} MB packed vs {summary['fp32_bytes'] / 1e6:.1f} MB fp32")
        if "accuracy" in res:
            a = res["accuracy"]
            print(f"perplexity fp32 {a['fp32']['ppl']:.3f}, 8da4w {a['8da4w']['ppl']:.3f}, ratio {a['ppl_ratio']:.4f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from .quantize import GroupSizeError

    _quiet()
    cfg = _deploy_config(args)
    if args.format == "hf":
        from ..model.hf import export_hf
        from ..model.io import CheckpointError

        try:
            export_hf(args.checkpoint, args.out)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        res = {"format": "hf", "out": str(args.out)}
    elif args.format == "executorch":
        from .export import export_executorch

        model, meta = _load(args.checkpoint)
        print(f"exporting {args.checkpoint} to ExecuTorch/XNNPACK (takes a minute or more)...", file=sys.stderr)
        try:
            res = export_executorch(model, args.out, args.max_context or cfg.max_context or max(cfg.contexts),
                                    quantize=not args.fp32, group_size=args.group_size or cfg.group_size,
                                    embedding_group_size=cfg.embedding_group_size, embedding_bits=cfg.embedding_bits,
                                    source=(meta.get("quantization") or {}).get("source") or args.checkpoint)
        except GroupSizeError as e:
            raise UserError(str(e)) from None
        res["out"] = str(args.out)
    else:
        from ..model.io import resolve_tokenizer_spec
        from .export import export_gguf

        model, meta = _load(args.checkpoint)
        if "quantization" in meta:
            raise UserError("GGUF export takes a float checkpoint, not a quantized one")
        try:
            res = export_gguf(model, args.out, resolve_tokenizer_spec(args.checkpoint, meta.get("tokenizer") or ""),
                              dtype=args.gguf_dtype)
        except ValueError as e:
            raise UserError(str(e)) from None
        res["out"] = str(args.out)
    if args.json:
        print_json(res)
    else:
        size = f" ({res['bytes'] / 1e6:.1f} MB)" if "bytes" in res else ""
        print(f"exported {args.checkpoint} as {args.format} -> {args.out}{size}")
    return 0


def _bench_gguf(ckpt: str, out: Path) -> Path | None:
    """The q4_0 GGUF of ``ckpt`` for the llama.cpp row, or None (with the reason on stderr) when the model
    cannot be written as one. A checkpoint without a tokenizer at the paper's vocabulary embeds Llama-3's."""
    from ..model.io import resolve_tokenizer_spec
    from ..tokenizer import implied_tokenizer
    from .export import export_gguf

    model, meta = _load(ckpt)
    spec = resolve_tokenizer_spec(ckpt, meta.get("tokenizer") or "") or implied_tokenizer(model.cfg.vocab_size)
    print(f"exporting {ckpt} to GGUF q4_0 for llama.cpp...", file=sys.stderr)
    try:
        export_gguf(model, out, spec, dtype="q4_0")
    except ValueError as e:
        print(f"llama.cpp row skipped: {e}", file=sys.stderr)
        return None
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses
    import tempfile

    from ..cli import UserError, print_json
    from .bench import bench, wants_gguf
    from .export import export_executorch, sidecar

    _quiet()
    cfg = _deploy_config(args)
    over = {k: v for k, v in (("threads", args.threads), ("new_tokens", args.new_tokens), ("fill", args.fill),
                              ("rounds", args.rounds)) if v is not None}
    if args.runtimes:
        over["runtimes"] = args.runtimes.split(",")
    if args.llama_bench:
        over["llama_bench"] = args.llama_bench
        over["runtimes"] = [*over.get("runtimes", cfg.runtimes), "llamacpp_native"]
    try:
        contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else cfg.contexts
        cfg = dataclasses.replace(cfg, contexts=contexts, **over)
        cfg.__post_init__()
    except ValueError as e:
        raise UserError(f"bad --contexts/--runtimes: {e}") from None
    target = Path(args.target)
    if not target.exists():
        raise FileNotFoundError(f"no checkpoint or .pte at {target}")
    with tempfile.TemporaryDirectory() as tmp:
        if target.suffix == ".pte":
            pte = target
            meta = json.loads(sidecar(pte).read_text()) if sidecar(pte).is_file() else {}
            if not meta:
                raise UserError(f"{pte}: no {sidecar(pte).name} next to it (written by `mobilellm-r1 export`)")
            src = meta.get("source") or None
            model_dir = src if src and Path(src).is_dir() else None
        else:
            model_dir, pte = target, args.pte
            if pte is None and "executorch_8da4w" in cfg.runtimes:
                pte = Path(tmp) / "model-8da4w.pte"
                print(f"exporting {target} (8da4w, context {max(contexts)})...", file=sys.stderr)
                model, _ = _load(str(target))
                export_executorch(model, pte, max(contexts), group_size=cfg.group_size, source=str(target))
        gguf = args.gguf
        if gguf is None and model_dir is not None and wants_gguf(cfg.runtimes):
            gguf = _bench_gguf(str(model_dir), Path(tmp) / "model-q4_0.gguf")
        try:
            res = bench(model_dir, pte, cfg, contexts, gguf=gguf)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.json:
        print_json(res)
    else:
        print(res["table"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="8da4w quantization (paper section 8) of a checkpoint (fake-quant model)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="quantized checkpoint directory to write")
    p.add_argument("--scheme", choices=["8da4w"], default=None)
    p.add_argument("--group-size", type=int, default=None,
                   help="weight group size (default: 32 if the hidden size is not a multiple of 128, else 128)")
    p.add_argument("--recipe", help="recipe whose [deploy] table sets the defaults")
    p.add_argument("--eval-shards", help="shard directory: also report the perplexity ratio 8da4w / fp32")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=4096, help="scored tokens per source for --eval-shards")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="export a checkpoint for on-device runtimes (ExecuTorch .pte, GGUF, HF)")
    p.add_argument("checkpoint", help="our checkpoint (or a `quantize` output for executorch)")
    p.add_argument("--format", required=True, choices=["hf", "executorch", "gguf"])
    p.add_argument("--out", required=True, help="output file (.pte / .gguf) or directory (hf)")
    p.add_argument("--max-context", type=int, default=0, help="static KV-cache length of the .pte")
    p.add_argument("--group-size", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="executorch: do not quantize")
    p.add_argument("--gguf-dtype", choices=GGUF_DTYPES, default="q4_0",
                   help="gguf: tensor type of the matrices (q4_0: 4-bit groups of 32, the paper's scheme)")
    p.add_argument("--recipe")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="decode tokens/s and memory across contexts vs the bandwidth roofline")
    p.add_argument("target", help="our checkpoint directory, or an exported .pte")
    p.add_argument("--contexts", help="comma-separated, e.g. 1024,2048,4096")
    p.add_argument("--pte", help="with a checkpoint: its exported .pte (default: export one to a temp dir)")
    p.add_argument("--runtimes", help="comma-separated subset of eager_fp32,generator_fp32,executorch_8da4w,"
                                      "llamacpp_q4_0")
    p.add_argument("--llama-bench", help="also time the GGUF with this llama-bench binary (llama.cpp built for "
                                         "this CPU): the llamacpp_native row")
    p.add_argument("--gguf", help="with a checkpoint: its q4_0 GGUF for llama.cpp (default: export one to a temp dir)")
    p.add_argument("--threads", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--rounds", type=int, help="decode rounds per context; the median is reported")
    p.add_argument("--fill", choices=["prefill", "synthetic"])
    p.add_argument("--recipe")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
