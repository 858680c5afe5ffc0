"""What each pipeline stage does: thin calls into the subsystem that owns the work.

Each runner takes the stage's :class:`~mobilellm_r1.pipeline.Context` and returns its outputs (JSON-able),
which the engine records in ``<run>/<stage>/stage.json`` for the stages after it and for the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError, Recipe
from .pipeline import Context, runner


def source_inputs(recipe: Recipe, corpus_dir: Path) -> dict[str, list[str]]:
    """Local inputs per recipe source: relative paths resolve against the corpus folder, and a source
    with no paths reads ``<corpus>/<name>.jsonl``."""
    out = {}
    for s in recipe.data.sources:
        paths = s.paths or [f"{s.name}.jsonl"]
        out[s.name] = [p if Path(p).is_absolute() or p.startswith("hf:") else str(corpus_dir / p) for p in paths]
    return out


@runner("corpus")
def run_corpus(ctx: Context) -> dict[str, Any]:
    if ctx.pipeline.corpus:  # a corpus the user already has: one file or folder per source
        p = Path(ctx.pipeline.corpus)
        if not p.is_dir():
            raise ConfigError(f"[pipeline] corpus {p} is not a folder")
        return {"dir": str(p.resolve()), "built": False}
    from .data.corpus import build_corpus

    manifest = build_corpus(ctx.out, progress=ctx.progress)
    return {"dir": str(ctx.out.resolve()), "built": True, "mb": manifest["total_bytes"] / 1e6,
            "arith_contamination": manifest["run"].get("arith_contamination"),
            "sources": {n: {"category": m["category"], "bytes": m.get("bytes")}
                        for n, m in manifest["sources"].items() if m["status"] == "ok"}}


@runner("tokenize")
def run_tokenize(ctx: Context) -> dict[str, Any]:
    from .data.shards import INDEX_FILE, ShardSet, TokenizeOptions, read_index, tokenize_sources

    recipe = ctx.recipe
    out = ctx.run_dir / (recipe.data.shards_dir or "shards")  # where training stages look for them
    # Shards feed the mixture sampler: only sources some pre-/mid-training mixture draws from (SFT and GRPO
    # read their datasets as conversations, from the corpus or ../shared).
    mixed = {n for st in recipe.stages.values() if st.kind in ("pretrain", "midtrain") for n in st.mixture}
    inputs = {n: p for n, p in source_inputs(recipe, Path(ctx.output("corpus", "dir"))).items()
              if n in mixed or not mixed}
    have = read_index(out)["sources"] if (out / INDEX_FILE).is_file() else {}
    cap = recipe.data.max_docs_per_source
    todo = {n: p for n, p in inputs.items()
            if n not in have or have[n]["inputs"] != p or have[n].get("max_docs", 0) != cap}
    if todo:
        tokenize_sources(todo, out, TokenizeOptions(tokenizer=recipe.data.tokenizer, progress=ctx.progress,
                                                    max_docs=cap))
    shards = ShardSet(out)
    return {"dir": str(out.resolve()), "tokenizer": shards.index["tokenizer"],
            "tokens": {n: shards.n_tokens(n) for n in shards.sources},
            "docs": {n: shards.index["sources"][n]["docs"] for n in shards.sources}}


@runner("curate")
def run_curate(ctx: Context) -> dict[str, Any]:
    """Section 5.1.1 / Figure 5: representative sets per source and the C/M/K probing sets."""
    from .curation import CurationConfig, run_curation

    recipe = ctx.recipe
    cfg = recipe.section("curation", CurationConfig)
    caps = {s.name: s.capabilities for s in recipe.data.sources if s.capabilities}
    inputs = {n: p for n, p in source_inputs(recipe, Path(ctx.output("corpus", "dir"))).items() if n in caps}
    summary = run_curation(cfg, inputs, ctx.out, source_caps=caps, progress=ctx.progress)
    probing = {p.stem: str(p.resolve()) for p in sorted((ctx.out / "probing").glob("*.jsonl"))}
    return {"dir": str(ctx.out.resolve()), "probing": probing,
            "steps": summary.get("steps"), "sources": summary.get("sources")}


def _influence_inputs(ctx: Context, sources: list[str]):
    """The [influence] config, shards, probe token rows (from the curate stage) and tokenizer."""
    from .data.shards import ShardSet
    from .influence.scores import InfluenceConfig, load_probes
    from .tokenizer import load_tokenizer

    cfg = ctx.recipe.section("influence", InfluenceConfig)
    tok = load_tokenizer(ctx.recipe.data.tokenizer)
    probe_dir = Path(ctx.output("curate", "dir")) / "probing" if "curate" in ctx.upstream else Path(cfg.probes)
    probes = load_probes(probe_dir, tok, cfg.capabilities, cfg.probe_samples, cfg.seq_len)
    shards = ShardSet(ctx.output("tokenize", "dir"))
    missing = [g for g in sources if g not in shards.sources]
    if missing:
        raise ConfigError(f"stage {ctx.stage.name!r}: source {missing[0]!r} has no shards")
    return cfg, shards, probes


def _target_sources(ctx: Context, stage: str) -> list[str]:
    return list(ctx.recipe.stages[stage].mixture)


@runner("mix")
def run_mix(ctx: Context) -> dict[str, Any]:
    """Eq. 2-6: influence of each source's samples on the C/M/K probe losses over the newest checkpoints of
    the ``from`` stage, turned into mixture weights; plus the Eq. 1 leave-one-out ablations."""
    import torch

    from .atomic import write_json
    from .influence.loo import run_loo
    from .influence.mixing import mix
    from .influence.scores import read_scores, resolve_checkpoints, score_checkpoints, shard_samples, write_scores
    from .model.transformer import Transformer

    target = ctx.stage.config["for"][0]
    sources = _target_sources(ctx, target)
    cfg, shards, probes = _influence_inputs(ctx, sources)
    sources = cfg.sources or sources
    ckpts = resolve_checkpoints([str(ctx.run_dir / ctx.stage.config["from"])], cfg.last_checkpoints)
    samples = shard_samples(shards, sources, cfg.train_samples, cfg.seq_len, cfg.seed)
    scores, used = score_checkpoints(ckpts, samples, probes, cfg, progress=ctx.progress)
    write_scores(ctx.out / "scores", samples, scores, list(probes), cfg, {"checkpoints": used})
    rows, _ = read_scores(ctx.out / "scores")
    res = mix(rows, ctx.out / "mixture.toml", stage=target, floor=cfg.floor)
    out: dict[str, Any] = {"weights": res["weights"], "rho": res["rho"], "clamped": res["clamped"],
                           "checkpoints": [str(c) for c in ckpts], "samples": len(samples),
                           "mixture_toml": str(ctx.out / "mixture.toml"), "capabilities": list(probes)}
    if ctx.stage.config.get("loo", True):
        torch.manual_seed(ctx.recipe.run.seed)
        loo = run_loo(Transformer(ctx.recipe.model), shards, sources, probes, steps=cfg.loo_steps,
                      batch=cfg.loo_batch, seq_len=cfg.seq_len, lr=cfg.loo_lr, eval_every=cfg.loo_eval_every,
                      seed=ctx.recipe.run.seed, heldout_fraction=ctx.recipe.data.heldout_fraction,
                      progress=ctx.progress)
        write_json(ctx.out / "loo.json", loo)
        curves = {}  # Figure 6: probe NLL over training, normalised by its value at step 0
        for run, r in loo["runs"].items():
            steps = sorted(r["probe_nll"], key=int)
            first = r["probe_nll"][steps[0]]
            curves[run] = {c: [[int(st), r["probe_nll"][st][c] / first[c]] for st in steps] for c in probes}
        out["loo"] = {"capabilities": list(probes), "delta": loo["delta_l_relative"], "curves": curves,
                      "seconds": loo["seconds"], "file": str(ctx.out / "loo.json")}
    return out


@runner("coevolve")
def run_coevolve(ctx: Context) -> dict[str, Any]:
    """Eq. 7-8: score raw mid-training samples with the current model, keep the positive ones, re-weight,
    train, repeat; the last phase's weights become the next mid-training stage's mixture."""
    import torch

    from .atomic import write_json
    from .influence.coevolve import coevolve
    from .influence.scores import InfluenceConfig
    from .model.gguf import load_any

    target = ctx.pipeline.coevolve_for
    sources = (ctx.recipe.section("influence", InfluenceConfig).coevolve_sources
               or _target_sources(ctx, target))
    cfg, shards, probes = _influence_inputs(ctx, sources)
    model, _ = load_any(ctx.output(ctx.stage.config["from"], "checkpoint"), dtype=torch.float32)
    res = coevolve(model, shards, sources, probes, cfg, progress=ctx.progress)
    write_json(ctx.out / "coevolve.json", res)
    weighted = [ph for ph in res["phases"] if ph.get("weights")]
    weights = weighted[-1]["weights"] if weighted else dict(ctx.recipe.stages[target].mixture)
    return {"weights": weights, "file": str(ctx.out / "coevolve.json"),
            "histograms": [ph["histogram"] for ph in res["phases"]],
            "phases": [{"n": ph["pool"], "positive_share": ph["positive_share"]} for ph in res["phases"]],
            "final_positive_share": res["final_positive_share"], "seconds": res["seconds"]}


def effective_recipe(ctx: Context):
    """The recipe with the pipeline's data decisions applied to the current stage: the influence-derived
    mixture (Eq. 6) where ``[pipeline] influence_mixture_for`` names it, the co-evolved weights (Eq. 8)
    for ``coevolve_for``."""
    import dataclasses

    recipe, name = ctx.recipe, ctx.stage.name
    st = recipe.stages[name]
    if name in ctx.pipeline.influence_mixture_for and "mix" in ctx.upstream:
        st = dataclasses.replace(st, mixture=dict(ctx.output("mix", "weights")))
    if name == ctx.pipeline.coevolve_for and "coevolve" in ctx.upstream:
        st = dataclasses.replace(st, mixture=dict(ctx.output("coevolve", "weights")))
    return dataclasses.replace(recipe, stages={**recipe.stages, name: st})


@runner("train")
@runner("sft")
def run_train(ctx: Context) -> dict[str, Any]:
    from .train.checkpoint import list_checkpoints
    from .train.loop import TrainOptions, train_stage

    out = ctx.out  # <run>/<stage>: where a later stage's init_from looks for <stage>/final
    recipe = effective_recipe(ctx)
    opts = TrainOptions(out=str(out), shards=ctx.output("tokenize", "dir"), resume=bool(list_checkpoints(out)),
                        progress=ctx.progress, dtype=ctx.pipeline.train_dtype)
    res = train_stage(recipe, ctx.stage.name, opts)
    keep = ("steps", "final_loss", "tokens_per_s", "mfu", "heldout_loss_initial", "heldout_loss_final",
            "checkpoint", "resumed_from", "autocast")
    return {**{k: res.get(k) for k in keep}, "metrics": str(out / "metrics.jsonl"),
            "mixture": recipe.stages[ctx.stage.name].mixture, "sft_data": res.get("sft_data")}


@runner("grpo")
def run_grpo(ctx: Context) -> dict[str, Any]:
    """Section 7.4: GRPO with verifiable rewards (our math grader)."""
    from .posttrain.grpo import GRPOOptions, train_grpo
    from .train.checkpoint import list_checkpoints

    out = ctx.out
    res = train_grpo(ctx.recipe, ctx.stage.name, GRPOOptions(out=str(out), resume=bool(list_checkpoints(out)),
                                                             progress=ctx.progress, dtype=ctx.pipeline.train_dtype))
    return {k: res.get(k) for k in ("steps", "checkpoint", "reward_mean", "completion_len_mean", "truncated",
                                    "reward_replay")} | {
        "metrics": str(out / "metrics.jsonl")}


def _eval_model(ctx: Context, ckpt: str, style: str, tag: str, tasks: list[str] | None = None,
                sub: str = "") -> dict[str, Any]:
    from .eval.runner import SHARED_BENCHMARKS, EvalConfig, all_tasks, resolve_data, run_eval
    from .eval.tasks.base import TaskDataError

    pc = ctx.pipeline
    rows: dict[str, Any] = {}
    known = all_tasks()
    for task in pc.eval_tasks if tasks is None else tasks:
        if task not in known:
            raise ConfigError(f"[pipeline] eval_tasks: unknown task {task!r} (known: {', '.join(sorted(known))})")
        try:
            data = resolve_data(known[task], "")
        except TaskDataError as e:
            rows[task] = {"skipped": str(e)}
            continue
        if data.startswith("hf:") and not pc.eval_hub:  # fail fast: an offline machine would wait on retries
            rows[task] = {"skipped": f"no local data (no {known[task].default_data} in {SHARED_BENCHMARKS}); "
                                     f"its hub copy {data} is read only with [pipeline] eval_hub = true"}
            continue
        cfg = EvalConfig(task=task, data=data, out=str(ctx.out / tag / (task + sub)), limit=pc.eval_limit,
                         style=style, max_new_tokens=pc.eval_max_new_tokens, batch_size=pc.eval_batch_size,
                         progress=ctx.progress)
        try:
            s = run_eval(ckpt, cfg)
        except TaskDataError as e:  # unreadable data (the hub offline, a malformed file)
            rows[task] = {"skipped": str(e)}
            continue
        rows[task] = {k: s.get(k) for k in ("pass@1", "ci95", "n", "samples_per_s", "style", "data", "format_rate")}
    return rows


def _format_rates(ctx: Context, ckpt: str, tag: str, style: str, rows: dict[str, Any]) -> dict[str, Any]:
    """Format following (issue 8): the share of 0-shot chat-style completions with a \\boxed{} answer on the
    math tasks. A post-trained model's chat-style rows already hold it; a base model is asked the same
    prompts in the chat template too (``TASK_chat/``), so before/after SFT compare like with like."""
    tasks = [t for t in ctx.pipeline.eval_tasks if t in ctx.pipeline.eval_format_tasks]
    if style != "chat":
        rows = _eval_model(ctx, ckpt, "chat", tag, tasks, sub="_chat")
    return {t: rows[t].get("format_rate") for t in tasks if "skipped" not in rows.get(t, {"skipped": 1})}


def _arith_floor(test_file: str, limit: int) -> dict[str, Any]:
    """The guessing floor of the scorecard: the SFT split's most common answer given to every test problem
    (the run's corpus files when there are, else the generated splits, which are the same)."""
    from .data.arith import generate_splits, guess_floor
    from .eval.tasks.base import read_rows

    sft = Path(test_file).with_name("arith_sft.jsonl") if test_file else None
    if sft is not None and sft.is_file():
        train = [row["answer"] for _, row in read_rows(sft)]
        test = [row["answer"] for _, row in read_rows(test_file)]
    else:
        splits = generate_splits()
        train, test = [p.answer for p in splits["sft"]], [p.answer for p in splits["test"]]
    return {**guess_floor(train, test[:limit] if limit else test), "what": "always the most common answer of the SFT split"}


def grpo_card(stage: str, outputs: dict[str, Any]) -> dict[str, Any] | None:
    """The scorecard's ``grpo`` entry from a GRPO stage's outputs: mean reward of the first and last three
    steps, and, where the stage replayed its first k steps' prompts and sampling seeds on the final policy
    (``replay_steps``), that mean beside the same k steps' own (``replay``): the paired measure. (A resumed
    stage reports every step: its per-step history is kept in its checkpoints, so ``reward_mean[:k]`` are
    the replayed steps.)"""
    r = outputs.get("reward_mean") or []
    if not r:
        return None
    card = {"stage": stage, "steps": len(r), "reward_first": sum(r[:3]) / len(r[:3]),
            "reward_last": sum(r[-3:]) / len(r[-3:]), "reward": r, "truncated": outputs.get("truncated") or []}
    replay = outputs.get("reward_replay") or []
    if replay and len(replay) <= len(r):
        k = len(replay)
        card["replay"] = {"steps": k, "during": sum(r[:k]) / k, "final": sum(replay) / k}
    return card


def _scorecard(ctx: Context, models: dict[str, str]) -> dict[str, Any]:
    """``<run>/scorecard.json``: the scorecard task asked 0-shot in the chat template of every model (base =
    last mid-training, sft = last SFT, final = last stage), and GRPO's mean reward over its first and last
    three steps. Each model's samples stay in ``evaluate/scorecard/<tag>/samples.jsonl``."""
    from .atomic import write_json
    from .eval.runner import EvalConfig, run_eval

    pc = ctx.pipeline
    task = pc.scorecard_task
    data = ""
    if task == "arith" and "corpus" in ctx.upstream:  # the run's own held-out split (same as the generated one)
        test = Path(ctx.output("corpus", "dir")) / "arith_test.jsonl"
        data = str(test) if test.is_file() else ""
    card: dict[str, Any] = {"task": task, "n": 0, "models": {}, "grpo": None}
    if task == "arith":
        card["floor"] = _arith_floor(data, pc.scorecard_limit)
    samples: dict[str, str] = {}
    done: dict[str, dict[str, Any]] = {}
    for tag, stage in models.items():
        if not stage:
            continue
        ckpt = ctx.output(stage, "checkpoint")
        if ckpt not in done:
            out = ctx.out / "scorecard" / tag
            s = run_eval(ckpt, EvalConfig(task=task, data=data, out=str(out), limit=pc.scorecard_limit, style="chat",
                                          max_new_tokens=pc.scorecard_max_new_tokens,
                                          batch_size=pc.scorecard_batch_size, progress=ctx.progress))
            done[ckpt] = {"row": {"stage": stage, **{k: s.get(k) for k in ("pass@1", "ci95", "format_rate", "by_level")}},
                          "samples": str(out / "samples.jsonl"), "n": s["n"], "data": s["data"]}
        card["models"][tag] = done[ckpt]["row"]
        samples[tag] = done[ckpt]["samples"]
        card["n"] = done[ckpt]["n"]
        card["data"] = done[ckpt]["data"]
    grpo = next((n for n, m in ctx.upstream.items() if m.get("kind") == "grpo"), None)
    if grpo:
        card["grpo"] = grpo_card(grpo, ctx.upstream[grpo]["outputs"])
    write_json(ctx.run_dir / "scorecard.json", card, indent=2)
    return {"file": str(ctx.run_dir / "scorecard.json"), "card": card, "samples": samples}


@runner("evaluate")
def run_evaluate(ctx: Context) -> dict[str, Any]:
    from .eval.probe import probe

    cfg = ctx.stage.config
    models = {"base": cfg["base"], "final": cfg["final"]}
    out: dict[str, Any] = {"models": {}, "tasks": {}, "probe": {}, "format": {}}
    if ctx.pipeline.scorecard_task:
        out["scorecard"] = _scorecard(ctx, {"base": cfg["base"], "sft": cfg.get("sft", ""), "final": cfg["final"]})
    seen: dict[str, str] = {}
    for tag, stage in models.items():
        if not stage:
            continue
        ckpt = ctx.output(stage, "checkpoint")
        out["models"][tag] = {"stage": stage, "checkpoint": ckpt}
        if ckpt in seen.values():
            continue
        seen[tag] = ckpt
        kind = ctx.recipe.stages[stage].kind
        style = "chat" if kind in ("sft", "grpo") else "base"
        out["tasks"][tag] = _eval_model(ctx, ckpt, style, tag)
        if ctx.pipeline.eval_format_tasks:
            out["format"][tag] = _format_rates(ctx, ckpt, tag, style, out["tasks"][tag])
        p = probe(ckpt, shards=ctx.output("tokenize", "dir"), max_tokens=ctx.pipeline.probe_max_tokens,
                  heldout_fraction=ctx.recipe.data.heldout_fraction, rankme_samples=256)
        out["probe"][tag] = {"overall": p["overall"], "rankme": p["rankme"]["rankme"],
                             "sources": {n: {k: v.get(k) for k in ("nll", "ppl", "bits_per_byte", "tokens", "rankme")}
                                         for n, v in p["sources"].items()}}
    return out


@runner("deploy")
def run_deploy_stage(ctx: Context) -> dict[str, Any]:
    """Paper section 8: 8da4w quantization, its perplexity cost, the ExecuTorch export and Table 10."""
    from .deploy.config import DeployConfig
    from .deploy.stage import run_deploy

    cfg = ctx.recipe.section("deploy", DeployConfig)
    ckpt = ctx.output(ctx.stage.config["model"], "checkpoint")
    res = run_deploy(ckpt, ctx.out, cfg, shards=ctx.output("tokenize", "dir"),
                     heldout_fraction=ctx.recipe.data.heldout_fraction, log=lambda s: None)
    return {"checkpoint": ckpt, "quantization": res.get("quantization"), "accuracy": res.get("accuracy"),
            "export": res.get("export"), "bench": res.get("bench"),
            "seconds": {k: res.get(k) for k in ("quantize_s", "export_s", "bench_s")}}


@runner("report")
def run_report(ctx: Context) -> dict[str, Any]:
    from .report import write_report

    return write_report(ctx.run_dir, ctx.recipe, ctx.upstream)
