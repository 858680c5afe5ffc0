"""`mobilellm-r1 eval` and `mobilellm-r1 grade {math,humaneval}`."""

from __future__ import annotations

import argparse


def cmd_eval(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from ..model.io import CheckpointError
    from .runner import EvalConfig, run_eval
    from .tasks.base import TaskDataError

    from .tasks.choice import CHOICE_TASKS

    if args.task in CHOICE_TASKS:  # scored by log-likelihood of each choice, no generation
        from .loglik import run_choice_eval

        try:
            res = run_choice_eval(args.model, args.task, args.data or "", limit=args.limit,
                                  batch_size=args.batch_size, fewshot=args.fewshot,
                                  fewshot_data=args.fewshot_data or "", out=args.out or "", device=args.device,
                                  progress=not args.json)
        except (TaskDataError, CheckpointError, ValueError) as e:
            raise UserError(str(e)) from None
        if args.json:
            print_json(res)
        else:
            print(f"{res['task']} ({res['n']} questions, {res.get('fewshot', 0)}-shot): acc {res['acc']:.4f} "
                  f"[{res['ci95'][0]:.4f}, {res['ci95'][1]:.4f}]  acc_norm {res['acc_norm']:.4f}")
        return 0
    cfg = EvalConfig(task=args.task, data=args.data or "", out=args.out or "", limit=args.limit,
                     n_samples=args.n_samples, style=args.style, temperature=args.temperature, top_p=args.top_p,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                     device=args.device, progress=not args.json, engine=args.engine)
    try:
        res = run_eval(args.model, cfg)
    except (TaskDataError, CheckpointError) as e:
        raise UserError(str(e)) from None
    if args.json:
        print_json(res)
    else:
        lo, hi = res["ci95"]
        print(f"{res['task']} ({res['style']}, {res['n']} problems x {res['n_samples']} samples): "
              f"pass@1 {res['pass@1']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]" +
              (f"  \\boxed{{}} in {res['format_rate']:.1%} of completions" if res.get("format_rate") is not None else ""))
        if res["samples_per_s"]:
            print(f"{res['samples_per_s']:.2f} samples/s, {res['tokens_per_s']:.1f} tokens/s → {res['out']}")
    return 0


def cmd_grade_math(args: argparse.Namespace) -> int:
    from ..cli import print_json
    from .grading.math import grade

    res = grade(args.pred, args.gold)
    if args.json:
        print_json(res)
    else:
        print("correct" if res["correct"] else "wrong", f"(pred {res['pred']!r}, gold {res['gold']!r})")
    return 0


def cmd_grade_humaneval(args: argparse.Namespace) -> int:
    from ..cli import UserError, print_json
    from .grading.code import grade_humaneval, load_samples

    try:
        res = grade_humaneval(load_samples(args.samples), timeout=args.timeout, workers=args.workers)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        print_json({k: v for k, v in res.items() if k != "results" or args.details})
    else:
        print(f"pass@1 {res['pass@1']:.4f} over {res['n_tasks']} tasks ({res['n_samples']} samples)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a benchmark: generation (gsm8k, math500, aime, amc, "
                                    "humaneval, mbpp, code_io) or multiple choice by log-likelihood (arc_easy, "
                                    "arc_challenge, boolq, piqa, siqa, hellaswag, obqa, winogrande, mmlu)")
    p.add_argument("--model", required=True, help="our checkpoint dir, a Hugging Face causal-LM dir (Llama4 or any transformers architecture), .gguf, or 'smollm2'")
    p.add_argument("--task", required=True)
    p.add_argument("--data", help="JSONL/Parquet file or hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--out", help="folder for samples.jsonl and summary.json (re-running resumes)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--n-samples", type=int, default=0, help="samples per problem (default: the task's)")
    p.add_argument("--style", choices=["auto", "base", "chat"], default="auto")
    p.add_argument("--temperature", type=float, default=-1.0, help="default: greedy for 1 sample, else 0.6")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8,
                   help="generation: slots of the continuous-batching engine (memory: slots x context); "
                        "multiple choice: rows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["ours", "vllm"], default="ours",
                   help="generation engine: ours (continuous batching) or vllm (optional extra: "
                        "pip install 'mobilellm-r1[vllm]')")
    p.add_argument("--fewshot", type=int, default=None, help="multiple choice: exemplars (MMLU default 5)")
    p.add_argument("--fewshot-data", help="multiple choice: file of exemplars (e.g. MMLU dev)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    g = sub.add_parser("grade", help="grade predictions without a model")
    gsub = g.add_subparsers(dest="grade_command", metavar="GRADE_COMMAND")
    gsub.required = True
    p = gsub.add_parser("math", help="is a predicted math answer equivalent to the gold one?")
    p.add_argument("--pred", required=True)
    p.add_argument("--gold", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_grade_math)
    p = gsub.add_parser("humaneval", help="pass@1 of HumanEval completions (JSONL: task_id, completion)")
    p.add_argument("--samples", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--details", action="store_true", help="include per-sample results in --json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_grade_humaneval)
