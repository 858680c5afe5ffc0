"""`mobilellm-r1 train` and `mobilellm-r1 distill cache`."""

from __future__ import annotations

import argparse
from pathlib import Path


def run_stage_from_args(args: argparse.Namespace, recipe, stage: str, out: str) -> dict | None:
    """Train ``stage`` with the command-line options shared by `train` and `sft`; the result on rank 0,
    None on the other ranks of a torchrun job."""
    import os

    from ..cli import UserError
    from ..model.io import CheckpointError
    from .distributed import shutdown
    from .loop import TrainOptions, train_stage

    opts = TrainOptions(out=out, max_steps=args.max_steps, resume=args.resume, device=args.device,
                        dtype=args.dtype, compile=args.compile, parallel=args.parallel,
                        shards=getattr(args, "shards", "") or "", init=args.init or "",
                        progress=not args.json and not args.quiet)
    try:
        res = train_stage(recipe, stage, opts)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    finally:
        shutdown()
    return res if int(os.environ.get("RANK", "0")) == 0 else None


def cmd_train(args: argparse.Namespace) -> int:
    from ..cli import print_json
    from ..config import load_recipe, resolve_recipe

    recipe = load_recipe(resolve_recipe(args.config))
    stage = args.stage or recipe.first_training_stage()
    recipe.stage(stage)  # a stage that does not exist is an error naming the stages that do
    res = run_stage_from_args(args, recipe, stage, args.out or str(Path("runs") / recipe.run.name / stage))
    if res is None:
        return 0
    if args.json:
        print_json(res)
    else:
        h0, h1 = res.get("heldout_loss_initial"), res.get("heldout_loss_final")
        print(f"{stage}: {res['steps']} steps, final loss {res['final_loss']:.4f}, "
              f"{res['tokens_per_s']:,.0f} tokens/s" + (f", MFU {res['mfu']:.1%}" if res.get("mfu") else ""))
        if h1 is not None:
            print(f"held-out loss {h0 if h0 is not None else float('nan'):.4f} -> {h1:.4f}")
        print(f"checkpoint: {res['checkpoint']}")
    return 0


def cmd_distill_cache(args: argparse.Namespace) -> int:
    from ..cli import print_json
    from .distill import write_cache

    srcs = [s for s in (args.sources or "").split(",") if s] or None
    try:
        res = write_cache(args.teacher, args.shards, args.out, args.top_k, args.seq_len, doc_mask=args.doc_mask,
                          batch=args.batch, sources=srcs, logp_dtype=args.logp_dtype, device=args.device,
                          progress=not args.json)
    except (ValueError, KeyError) as e:
        from ..cli import UserError

        raise UserError(str(e)) from None
    if args.json:
        print_json(res)
    else:
        print(f"top-{res['top_k']} cache of {res['teacher']} over {res['tokens']:,} tokens "
              f"({res['tokens_per_s']:,.0f} tokens/s) -> {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..config import TRAIN_DTYPES

    p = sub.add_parser("train", help="train one stage of a recipe (pre-training, mid-training with KD)")
    p.add_argument("--config", required=True, help="recipe TOML (or a recipe name in recipes/)")
    p.add_argument("--stage", help="stage to train (default: the recipe's first)")
    p.add_argument("--out", help="output folder (default runs/<run name>/<stage>)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (with --resume: continue to N)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--shards", help="token shards folder (overrides data.shards_dir)")
    p.add_argument("--init", help="start from this checkpoint instead of the stage's init_from")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=TRAIN_DTYPES, default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fast: bf16 on a CPU too where measured faster")
    p.add_argument("--compile", action="store_true", help="torch.compile every block")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="multi-rank mode under torchrun")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    d = sub.add_parser("distill", help="knowledge-distillation helpers")
    dsub = d.add_subparsers(dest="distill_command", metavar="DISTILL_COMMAND")
    dsub.required = True
    p = dsub.add_parser("cache", help="precompute a teacher's top-k log-probs beside token shards")
    p.add_argument("--teacher", required=True, help="checkpoint dir, HF dir, .gguf file or 'smollm2'")
    p.add_argument("--shards", required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=2048, help="the student stage's seq_len (chunking must match)")
    p.add_argument("--doc-mask", action="store_true", help="the stage trains with document-masked attention")
    p.add_argument("--sources", default="")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--logp-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_distill_cache)
