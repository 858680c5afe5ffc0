"""`mobilellm-r1 model …` (info, init, export, import) and `mobilellm-r1 generate`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _dtype(name: str | None, device: str = "cpu"):
    import torch

    if name in (None, "keep"):
        return None
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, _DTYPES[name])


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _preset_config(args: argparse.Namespace):
    from ..config import model_preset

    overrides: dict[str, Any] = {}
    if getattr(args, "vocab_size", None):
        overrides["vocab_size"] = args.vocab_size
    if getattr(args, "weight_sharing", False):
        overrides["weight_sharing"] = True
    return model_preset(args.preset, **overrides)


def _shape(cfg) -> dict[str, Any]:
    from ..config import to_dict

    return to_dict(cfg)


def cmd_info(args: argparse.Namespace) -> int:
    from ..cli import print_json

    cfg = _preset_config(args)
    params = cfg.param_count()
    non_emb = cfg.non_embedding_param_count()
    info = {
        "preset": cfg.preset, "params": params, "non_embedding_params": non_emb,
        "embedding_params": params - non_emb,
        "effective_layers": cfg.n_layers * (2 if cfg.weight_sharing else 1),
        "fp32_bytes": params * 4, "bf16_bytes": params * 2, "shape": _shape(cfg),
    }
    if args.json:
        print_json(info)
    else:
        print(f"preset {cfg.preset}: {params:,d} parameters ({non_emb:,d} non-embedding), "
              f"{cfg.n_layers} layers{' x2 (weight sharing)' if cfg.weight_sharing else ''}, dim {cfg.dim}, "
              f"heads {cfg.n_heads}/{cfg.n_kv_heads} x {cfg.head_dim}, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, "
              f"context {cfg.max_seq_len}, rope theta {cfg.rope_theta:g}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    import torch

    from ..cli import print_json
    from ..tokenizer import implied_tokenizer
    from .io import save_model
    from .transformer import Transformer

    cfg = _preset_config(args)
    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    spec = args.tokenizer if args.tokenizer is not None else implied_tokenizer(cfg.vocab_size)
    save_model(args.out, model, tokenizer_spec=spec)
    res = {"out": str(args.out), "preset": cfg.preset, "params": model.param_count(), "seed": args.seed,
           "tokenizer": spec}
    if args.json:
        print_json(res)
    else:
        print(f"initialised {cfg.preset} ({res['params']:,d} parameters, seed {args.seed}) → {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from .hf import export_hf
    from .io import CheckpointError

    try:
        out = export_hf(args.checkpoint, args.hf, tokenizer_files_dir=args.tokenizer_files,
                        dtype=_dtype(args.dtype), arch=args.arch)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    files = sorted(p.name for p in Path(out).iterdir())
    if args.json:
        print_json({"out": str(out), "files": files})
    else:
        print(f"exported {args.checkpoint} → {out} ({', '.join(files)})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from .hf import import_hf
    from .io import CheckpointError

    src = Path(args.hf_dir)
    if not src.is_dir() and not (src.is_file() and src.suffix == ".gguf"):
        raise UserError(f"not a directory or a .gguf file: {args.hf_dir}")
    try:
        if src.suffix == ".gguf" and src.is_file():
            from .gguf import import_gguf

            out, model, spec = import_gguf(src, args.out, tokenizer_spec=args.tokenizer, dtype=_dtype(args.dtype))
        else:
            out, model, spec = import_hf(src, args.out, tokenizer_spec=args.tokenizer,
                                         dtype=_dtype(args.dtype), detect_sharing=not args.no_detect_sharing)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    res = {"out": str(out), "params": model.param_count(), "n_layers": model.cfg.n_layers,
           "weight_sharing": model.cfg.weight_sharing, "dtype": str(model.embed_tokens.weight.dtype).split(".")[-1],
           "tokenizer": spec}
    if args.json:
        print_json(res)
    else:
        print(f"imported {args.hf_dir} → {out} ({res['params']:,d} parameters, {res['dtype']}, "
              f"tokenizer {spec or '(none)'})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from .generate import generate
    from .io import CheckpointError, load_model, resolve_tokenizer_spec

    device = _device(args.device)
    try:
        model, meta = load_model(args.checkpoint, device=device, dtype=_dtype(args.dtype, device))
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if device == "cpu":
        model.decode_layout()
    from ..tokenizer import load_tokenizer  # lazily: only this command needs a tokenizer

    spec = resolve_tokenizer_spec(args.checkpoint, args.tokenizer or meta.get("tokenizer") or "llama3")
    tok = load_tokenizer(spec)
    cfg = model.cfg
    prompt_ids = tok.encode(args.prompt, bos=not args.no_bos)
    stop_ids = sorted({i for i in list(tok.eos_ids) + list(cfg.eos_ids) if 0 <= i < cfg.vocab_size})
    try:
        res = generate(model, [prompt_ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, stop_token_ids=stop_ids, stop_strings=args.stop, decode=tok.decode)
    except ValueError as e:
        raise UserError(str(e)) from None
    new = res.token_ids[0]
    shown = new[:-1] if res.finish_reasons[0] == "stop_token" else new
    text = tok.decode(shown)
    hit = res.stop_strings[0]
    if hit is not None and hit in text:
        text = text[: text.index(hit)]
    if args.json:
        print_json({"text": text, "prompt_ids": prompt_ids, "token_ids": new, "tokens_per_s": res.tokens_per_s,
                    "finish_reason": res.finish_reasons[0], "tokenizer": spec, "device": device, **res.timing()})
    else:
        print(args.prompt + text)
        print(f"[{len(new)} tokens, {res.tokens_per_s:.1f} tokens/s, {res.finish_reasons[0]}]")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="model presets, init, HF export/import")
    sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("info", help="parameter counts and shape of a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--weight-sharing", action="store_true", help="MobileLLM-LS block-wise sharing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--weight-sharing", action="store_true")
    p.add_argument("--tokenizer", help="tokenizer spec stored with the checkpoint (default llama3 for the "
                                       "128,256-id vocabulary)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face Llama4ForCausalLM (or "
                                      "Qwen3ForCausalLM) directory")
    p.add_argument("checkpoint")
    p.add_argument("--arch", default="llama4",
                   help="llama4 (Llama4ForCausalLM, default; our import reads it back) or qwen3 "
                        "(Qwen3ForCausalLM: vLLM, SGLang, MLX, llama.cpp's converter)")
    p.add_argument("--hf", required=True, help="output directory")
    p.add_argument("--tokenizer-files", help="folder of tokenizer files to copy alongside")
    p.add_argument("--dtype", choices=["keep", "float32", "bfloat16", "float16"], default="keep")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="convert a Hugging Face Llama4ForCausalLM directory or a llama GGUF file "
                                      "to a checkpoint")
    p.add_argument("hf_dir", help="HF directory, or a .gguf file (dequantized to float32 unless --dtype)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="tokenizer spec (default: llama3 for the Llama-3 vocabulary, else "
                                       "the directory's tokenizer files)")
    p.add_argument("--dtype", choices=["keep", "float32", "bfloat16", "float16"], default="keep")
    p.add_argument("--no-detect-sharing", action="store_true",
                   help="do not fold identical consecutive layer pairs into weight sharing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = subparsers.add_parser("generate", help="generate text from a checkpoint (greedy by default)")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer spec")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)
