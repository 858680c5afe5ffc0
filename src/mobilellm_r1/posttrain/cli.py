"""`mobilellm-r1 sft`, `mobilellm-r1 grpo` and `mobilellm-r1 chat`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _stage(args: argparse.Namespace, kind: str):
    """The recipe and the stage to run: ``--stage``, else the recipe's first stage of ``kind``."""
    from ..cli import UserError
    from ..config import load_recipe, resolve_recipe

    recipe = load_recipe(resolve_recipe(args.config))
    if args.stage:
        name = args.stage
        if recipe.stage(name).kind != kind:
            raise UserError(f"stage {name!r} of {recipe.path} is a {recipe.stage(name).kind!r} stage, not {kind!r}")
    else:
        names = [n for n, s in recipe.stages.items() if s.kind == kind]
        if not names:
            raise UserError(f"{recipe.path} has no {kind!r} stage")
        name = names[0]
    return recipe, name, args.out or str(Path("runs") / recipe.run.name / name)


def cmd_sft(args: argparse.Namespace) -> int:
    from ..cli import print_json
    from ..train.cli import run_stage_from_args

    recipe, stage, out = _stage(args, "sft")
    res = run_stage_from_args(args, recipe, stage, out)  # SFT is the one training loop with another batch source
    if res is None:
        return 0
    if args.json:
        print_json(res)
        return 0
    d = res["sft_data"]
    print(f"{stage}: {res['steps']} steps, final loss {res['final_loss']:.4f}, {res['tokens_per_s']:,.0f} tokens/s")
    print(f"data: {d['conversations']} conversations in {d['rows']} rows of {recipe.stage(stage).seq_len + 1} "
          f"tokens ({'packed' if d['packing'] else 'one per row'}); skipped {d['no_assistant']} without an "
          f"assistant turn, {d['too_long']} too long" +
          (f"; optional datasets not found: {', '.join(d['missing_optional'])}" if d["missing_optional"] else ""))
    print(f"checkpoint: {res['checkpoint']}")
    return 0


def cmd_grpo(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from ..model.io import CheckpointError
    from ..runlock import run_lock
    from ..stages import grpo_card
    from .grpo import GRPOOptions, train_grpo

    recipe, stage, out = _stage(args, "grpo")
    opts = GRPOOptions(out=out, max_steps=args.max_steps, resume=args.resume, device=args.device,
                       init=args.init or "", progress=not args.json and not args.quiet, dtype=args.dtype)
    try:
        with run_lock(out):  # one writer per output folder (`run` holds its run directory itself)
            res = train_grpo(recipe, stage, opts)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if args.json:
        print_json(res)
        return 0
    r, n = res["reward_mean"], res["completion_len_mean"]
    print(f"{stage}: {res['steps']} steps of {res['prompts_per_step']} prompts x {res['group_size']} samples")
    if r:
        print(f"mean reward {r[0]:.3f} -> {r[-1]:.3f}; mean completion length {n[0]:.0f} -> {n[-1]:.0f} tokens")
    rp = (grpo_card(stage, res) or {}).get("replay")
    if rp:
        print(f"first {rp['steps']} steps' prompts and seeds again, final policy: mean reward "
              f"{rp['during']:.3f} -> {rp['final']:.3f}")
    print(f"curves: {Path(res['out']) / 'metrics.jsonl'}; checkpoint: {res['checkpoint']}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import sys

    from ..cli import print_json
    from .chat import ChatOptions, ChatSession, interactive

    session = ChatSession(args.ckpt, ChatOptions(system=args.system or "", max_new_tokens=args.max_new_tokens,
                                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                                 device=args.device, tokenizer=args.tokenizer or ""))
    if args.prompt is None:
        interactive(session)
        return 0
    res = session.reply(args.prompt, None if args.json else sys.stdout)
    if args.json:
        print_json(res)
    else:
        print()
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe TOML (or a recipe name in recipes/)")
    p.add_argument("--out", help="output folder (default runs/<run name>/<stage>)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (with --resume: continue to N)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--init", help="start from this checkpoint instead of the stage's init_from")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")


def register(sub: argparse._SubParsersAction) -> None:
    from ..config import TRAIN_DTYPES

    p = sub.add_parser("sft", help="supervised fine-tuning stage of a recipe (general or reasoning SFT)")
    _common(p)
    p.add_argument("--stage", help="SFT stage to run (default: the recipe's first SFT stage)")
    p.add_argument("--dtype", choices=TRAIN_DTYPES, default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fast: bf16 on a CPU too where measured faster")
    p.add_argument("--compile", action="store_true", help="torch.compile every block")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="multi-rank mode under torchrun")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("grpo", help="GRPO with verifiable rewards (paper section 7.4)")
    _common(p)
    p.add_argument("--stage", help="GRPO stage to run (default: the recipe's first GRPO stage)")
    p.add_argument("--dtype", choices=TRAIN_DTYPES, default="auto",
                   help="the policy update's precision (as sft --dtype); rollouts are generated in fp32")
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("chat", help="chat with a checkpoint (interactive, streamed; or one-shot --prompt)")
    p.add_argument("ckpt", help="checkpoint dir, HF dir, .gguf file, exported .pte or 'smollm2'")
    p.add_argument("--tokenizer", help="tokenizer spec (default: the model's; a .pte: its source checkpoint's)")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_chat)
