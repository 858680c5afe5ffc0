"""The stage graph of a recipe: `mobilellm-r1 run RECIPE` runs the whole MobileLLM-R1 pipeline.

build corpus → tokenize → curate → influence mixing → pre-train P1 → P2 → mid-train P1 (KD) → co-evolve →
mid-train P2 (KD) → general SFT → reasoning SFT → (GRPO) → evaluate → deploy (quantize, export, decode benchmark) → report.

Every stage writes into ``<run>/<stage>/`` and, when it finishes, ``<run>/<stage>/stage.json``: the hash of
what determines it (its config and its upstream stages' run ids), its outputs and its wall time. A stage
whose manifest matches is skipped, so re-running a finished run does nothing and an interrupted run goes
on from the stage it was in (training stages resume from their newest checkpoint inside it). Every
finished stage gets a fresh ``run_id``, so re-running a stage (``--from`` / ``--only``) re-runs everything
downstream of it on the next full run.

Stages are small functions ``fn(ctx) -> outputs`` registered by kind; the graph is derived from the recipe
(its ``[stages.*]`` in order, plus the data and evaluation stages around them) and the ``[pipeline]``
table (:class:`PipelineConfig`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .atomic import write_json
from .config import ConfigError, Recipe, to_dict
from .runlock import run_lock

MANIFEST = "stage.json"


@dataclass
class PipelineConfig:
    """``[pipeline]``: which optional stages run and how the evaluation/report stages are sized."""
    skip: list[str] = field(default_factory=list)  # stage names left out of the graph
    corpus: str = ""  # an existing corpus folder to use instead of building the embedded one
    # Training stages whose mixture the influence stage (Eq. 6) replaces; empty: the recipe's weights stay.
    influence_mixture_for: list[str] = field(default_factory=list)
    # The stage whose checkpoints the influence stage scores; "" = the one the first of those stages starts from.
    influence_from: str = ""
    loo: bool = True  # run the Eq. 1 leave-one-out ablations in the influence stage
    # The mid-training stage whose mixture co-evolution (Eq. 7-8) sets; "" disables co-evolution.
    coevolve_for: str = ""
    eval_tasks: list[str] = field(default_factory=lambda: ["gsm8k", "math500", "humaneval"])
    eval_limit: int = 0  # examples per task (0: all)
    eval_max_new_tokens: int = 0  # 0: the task's default
    eval_batch_size: int = 8
    # Format following (share of completions with a \\boxed{} answer) before vs after post-training: on these
    # of eval_tasks, the base model is also asked 0-shot in the chat template; [] turns it off.
    eval_format_tasks: list[str] = field(default_factory=lambda: ["gsm8k", "math500", "aime", "amc"])
    probe_max_tokens: int = 20000  # held-out tokens per source for the perplexity/RankMe probe
    # Tasks whose data is on the hub only (no file in ../shared/data/benchmarks): read it from there (needs
    # internet), or skip the task with one line saying why, touching no network (the default).
    eval_hub: bool = False
    # The scorecard (<run>/scorecard.json, the report's first table): one task, every problem, asked 0-shot
    # in the chat template of the base (last mid-training), SFT (last SFT) and final model; "" = none.
    scorecard_task: str = ""
    scorecard_limit: int = 0  # problems (0: all)
    scorecard_max_new_tokens: int = 0  # 0: the task's default
    scorecard_batch_size: int = 64
    # Precision of the training stages (train --dtype): auto = bf16 autocast on CUDA, fp32 on CPU; fast = bf16
    # also on a CPU whose bf16 matmuls measure faster (AVX-512 BF16 / AMX), fp32 elsewhere.
    train_dtype: str = "auto"


@dataclass
class Stage:
    name: str
    kind: str
    deps: list[str]
    config: dict[str, Any]  # JSON-able: what, besides the deps, determines the stage's result


@dataclass
class Context:
    recipe: Recipe
    run_dir: Path
    pipeline: PipelineConfig
    stage: Stage
    upstream: dict[str, dict[str, Any]]  # name -> manifest of every finished stage
    progress: bool = True

    @property
    def out(self) -> Path:
        return self.run_dir / self.stage.name

    def output(self, stage: str, key: str) -> Any:
        if stage not in self.upstream:
            raise ConfigError(f"stage {self.stage.name!r} needs stage {stage!r}, which has not run")
        return self.upstream[stage]["outputs"][key]


# kind -> fn(ctx) -> outputs (JSON-able dict)
RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {}


def runner(kind: str):
    def deco(fn):
        RUNNERS[kind] = fn
        return fn
    return deco


# ----------------------------------------------------------------------------------------- the graph

# Stage fields added after runs existed, at the default that leaves a finished stage's result as it was:
# left out of the stage's key, so upgrading the package does not re-run the stages of existing runs.
_KEYLESS_DEFAULTS = {"nonfinite": "stop", "nonfinite_max_skips": 10}


def stage_dict(st: Any) -> dict[str, Any]:
    return {k: v for k, v in to_dict(st).items() if k not in _KEYLESS_DEFAULTS or v != _KEYLESS_DEFAULTS[k]}


def plan(recipe: Recipe) -> list[Stage]:
    """The stages of ``recipe`` in the order they run (each after all of its deps)."""
    pc = recipe.section("pipeline", PipelineConfig)
    train_names = list(recipe.stages)
    unknown = [n for n in pc.influence_mixture_for + [x for x in (pc.coevolve_for, pc.influence_from) if x]
               if n not in recipe.stages]
    if unknown:
        raise ConfigError(f"[pipeline] names stage {unknown[0]!r}, which the recipe does not define "
                          f"(stages: {', '.join(train_names)})")
    stages = [Stage("corpus", "corpus", [], {"corpus": pc.corpus}),
              Stage("tokenize", "tokenize", ["corpus"], {"data": to_dict(recipe.data)})]
    stages.append(Stage("curate", "curate", ["corpus"], {"curation": recipe.sections.get("curation", {}),
                                                          "sources": to_dict(recipe.data.sources)}))
    prev = ""
    for name in train_names:
        st = recipe.stages[name]
        if name in pc.influence_mixture_for and not any(s.name == "mix" for s in stages):
            # Eq. 2-6 (+ the Eq. 1 LOO ablations): score the checkpoints of the stage this one starts from
            src = pc.influence_from or (st.init_from if st.init_from in recipe.stages else prev)
            if not src:
                raise ConfigError(f"[pipeline] influence_mixture_for: stage {name!r} has no earlier stage whose "
                                  "checkpoints could be scored (set influence_from)")
            stages.append(Stage("mix", "mix", ["tokenize", "curate", src],
                                {"influence": recipe.sections.get("influence", {}), "for": pc.influence_mixture_for,
                                 "from": src, "loo": pc.loo}))
        deps = ["tokenize"]
        if st.init_from in recipe.stages:
            deps.append(st.init_from)
        if name in pc.influence_mixture_for:
            deps.append("mix")
        if name == pc.coevolve_for:
            src = st.init_from if st.init_from in recipe.stages else prev
            stages.append(Stage("coevolve", "coevolve", ["tokenize", "curate", src],
                                {"influence": recipe.sections.get("influence", {}), "stage": stage_dict(st),
                                 "from": src}))
            deps.append("coevolve")
        kind = {"pretrain": "train", "midtrain": "train"}.get(st.kind, st.kind)
        stages.append(Stage(name, kind, deps, {"stage": stage_dict(st), "model": to_dict(recipe.model),
                                               "seed": recipe.run.seed}))
        prev = name
    last = train_names[-1] if train_names else ""
    base = next((n for n in reversed(train_names) if recipe.stages[n].kind in ("pretrain", "midtrain")), "")
    sft = next((n for n in reversed(train_names) if recipe.stages[n].kind == "sft"), "")
    if last:
        stages.append(Stage("evaluate", "evaluate", [n for n in dict.fromkeys(["corpus", base, sft, last]) if n],
                            {"eval": recipe.sections.get("eval", {}), "pipeline": to_dict(pc),
                             "base": base, "sft": sft, "final": last}))
        # quantize (8da4w) → perplexity ratio → ExecuTorch export → decode benchmark, one stage (deploy/stage.py)
        stages.append(Stage("deploy", "deploy", ["tokenize", last], {"deploy": recipe.sections.get("deploy", {}),
                                                                      "model": last}))
    keep = [s for s in stages if s.name not in pc.skip]
    kept = {s.name for s in keep}
    for s in keep:  # a skipped stage's dependants lose the edge, not the stage
        s.deps = [d for d in s.deps if d in kept]
    stages = keep + [Stage("report", "report", [s.name for s in keep], {})]
    return stages


# ------------------------------------------------------------------------------------------ manifests


def stage_key(stage: Stage, upstream: dict[str, dict[str, Any]]) -> str:
    blob = json.dumps({"kind": stage.kind, "config": stage.config,
                       "deps": {d: upstream[d]["run_id"] for d in stage.deps if d in upstream}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(run_dir: Path, name: str) -> dict[str, Any] | None:
    p = run_dir / name / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None  # a torn write cannot happen (atomic), but a hand-edited file must not crash the run
    return m if isinstance(m, dict) and m.get("status") == "done" else None


# ---------------------------------------------------------------------------------------------- run


@dataclass
class RunOptions:
    out: str = ""  # run directory (default runs/<recipe run.name>)
    from_stage: str = ""  # re-run this stage and everything after it
    only: str = ""  # run just this stage (its deps must be done)
    until: str = ""  # stop after this stage
    progress: bool = True
    log: Callable[[str], None] | None = None


RUNNING = "stage.running.json"  # the key of a stage that started and has not finished (yet)
KEEP_ON_RERUN = {"corpus"}  # its folder is the corpus, whose sources are rebuilt or kept by their own check


def _fresh_stage_dir(out: Path, key: str, finished: bool) -> None:
    """Ready ``out`` for a stage run under ``key``. An interrupted run of the same key keeps its folder, so
    a training stage resumes from its newest checkpoint. A stage run again (a new key, or --from / --only
    on a finished one) starts empty: its old checkpoints would otherwise be resumed as if they were its
    own (measured: a GRPO stage changed from 24 to 10 steps "ran" in 3 s and kept the 24-step model)."""
    marker = out / RUNNING
    started = json.loads(marker.read_text()).get("key") if marker.is_file() else None
    if out.is_dir() and out.name not in KEEP_ON_RERUN and (finished or (started is not None and started != key)):
        stale = out.with_name(f".{out.name}.stale")
        shutil.rmtree(stale, ignore_errors=True)
        out.rename(stale)  # one rename, then the delete: an interruption never leaves a half-emptied folder
        shutil.rmtree(stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"key": key})


def run_pipeline(recipe: Recipe, opts: RunOptions) -> dict[str, Any]:
    """Run the stages of ``recipe`` into its run directory, holding the directory's lock (one writer; the
    training stages run in this process and lock their own folders inside it re-entrantly)."""
    stages = plan(recipe)
    names = [s.name for s in stages]
    for flag, val in (("--from", opts.from_stage), ("--only", opts.only), ("--until", opts.until)):
        if val and val not in names:
            raise ConfigError(f"{flag} {val!r}: no such stage (stages: {', '.join(names)})")
    with run_lock(opts.out or Path("runs") / recipe.run.name):
        return _run_stages(recipe, opts, stages)


def _run_stages(recipe: Recipe, opts: RunOptions, stages: list[Stage]) -> dict[str, Any]:
    names = [s.name for s in stages]
    pc = recipe.section("pipeline", PipelineConfig)
    run_dir = Path(opts.out or Path("runs") / recipe.run.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = opts.log or (lambda s: None)
    forced = set(names[names.index(opts.from_stage):]) if opts.from_stage else set()
    if opts.only:
        forced = {opts.only}
    upstream: dict[str, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    for st in stages:
        have = read_manifest(run_dir, st.name)
        missing = [d for d in st.deps if d not in upstream]
        selected = not opts.only or st.name == opts.only
        key = stage_key(st, upstream)
        if have is not None and have.get("key") == key and st.name not in forced:
            upstream[st.name] = have
            done.append({"stage": st.name, "status": "cached", "seconds": have.get("seconds", 0.0)})
            log(f"[{st.name}] up to date ({have.get('seconds', 0.0):.1f}s when it ran)")
        elif not selected:
            if have is not None:  # --only: others keep what they have, even if stale
                upstream[st.name] = have
            continue
        elif missing:
            raise ConfigError(f"stage {st.name!r} needs {', '.join(missing)} first (run without --only)")
        else:
            if st.kind not in RUNNERS:
                raise ConfigError(f"stage {st.name!r}: no runner for kind {st.kind!r} "
                                  f"(known: {', '.join(sorted(RUNNERS))})")
            log(f"[{st.name}] running")
            t0 = time.perf_counter()
            ctx = Context(recipe, run_dir, pc, st, upstream, opts.progress)
            _fresh_stage_dir(ctx.out, key, finished=have is not None)
            outputs = RUNNERS[st.kind](ctx)
            secs = time.perf_counter() - t0
            manifest = {"stage": st.name, "kind": st.kind, "status": "done", "key": key,
                        "run_id": uuid.uuid4().hex[:12], "deps": {d: upstream[d]["run_id"] for d in st.deps},
                        "config": st.config, "outputs": outputs, "seconds": secs, "finished": time.time()}
            write_json(ctx.out / MANIFEST, manifest, indent=2)
            (ctx.out / RUNNING).unlink(missing_ok=True)
            upstream[st.name] = manifest
            done.append({"stage": st.name, "status": "ran", "seconds": secs})
            log(f"[{st.name}] done in {secs:.1f}s")
        if opts.until and st.name == opts.until:
            break
    return {"run_dir": str(run_dir), "recipe": recipe.path, "stages": done}


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """The plan with token budgets and an estimate of GPU-hours (6·N·D FLOPs at an assumed MFU)."""
    from .train.metrics import flops_per_token

    gpu_peak, mfu = 989e12, 0.35  # H100 bf16 dense peak; the MFU our 950m run reached on one H100 is 0.39
    rows, total = [], 0.0
    for st in plan(recipe):
        row: dict[str, Any] = {"stage": st.name, "kind": st.kind, "deps": st.deps}
        if st.name in recipe.stages:
            sc = recipe.stages[st.name]
            tokens = sc.tokens or (sc.steps * sc.global_batch_tokens)
            fpt = flops_per_token(recipe.model, sc.seq_len)
            hours = tokens * fpt / (gpu_peak * mfu) / 3600 if tokens else 0.0  # fpt counts fwd + bwd
            row.update(tokens=tokens, gpu_hours=hours)
            total += hours
        rows.append(row)
    return {"recipe": recipe.path, "model_params": recipe.model.param_count(), "stages": rows,
            "gpu_hours_total": total, "assumptions": {"gpu_peak_flops": gpu_peak, "mfu": mfu}}
