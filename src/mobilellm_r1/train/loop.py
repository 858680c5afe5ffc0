"""One training loop for every stage: pre-training, mid-training with knowledge distillation, SFT.

SFT differs only in its batch source (:mod:`mobilellm_r1.posttrain.sft_data`): packed conversations with
targets on assistant tokens only and document ids that reset attention and positions per conversation.

A stage (``[stages.NAME]`` of a recipe, paper Table 2) says what to optimise and on which data; the
:class:`TrainOptions` say where and how to run it (output folder, device, DDP/FSDP, compile, step cap).

Per optimizer step: ``accum`` micro-batches of ``micro_batch_size`` rows per rank, with
``accum = global_batch_tokens / (micro_batch_size * seq_len * world_size)``. The loss of a step is the
*sum* over its kept target tokens divided by the number of kept tokens in the whole global batch (counted
before the forward passes), so 1 process and N ranks with the same global batch compute the same number
whatever the per-rank token counts (SFT masks make them unequal). AdamW (betas/eps/weight decay from the
stage; decay on matrices only), clipping, lr from :mod:`.schedule`.

Exact resume: the model, the optimizer, every rank's sampler state and RNG states are checkpointed;
``resume`` continues from the newest checkpoint and produces the same losses and weights, bit for bit on
CPU, as a run that was never interrupted.

Faults (:mod:`mobilellm_r1.faults`): the stage holds its output folder's lock (:mod:`mobilellm_r1.runlock`);
SIGTERM / SIGUSR1 end the current step, checkpoint it and raise :class:`~mobilellm_r1.faults.Preempted`; a
non-finite loss or gradient norm stops the stage (or skips the update, ``nonfinite = "skip"``) before the
optimizer steps, and a checkpoint with non-finite weights is never written.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from ..config import ConfigError, Recipe, StageConfig
from ..faults import NonFiniteError, NonFiniteGuard, PreemptionWatch, Preempted
from ..model.io import CheckpointError
from ..model.transformer import Transformer
from ..runlock import run_lock
from . import checkpoint as ckpt
from . import distributed as D
from .metrics import MetricsLog, device_peak, flops_per_token, use_bf16_autocast
from .objectives import IGNORE, TeacherTargets, head_loss, next_token_targets
from .schedule import lr_at


@dataclass
class TrainOptions:
    out: str
    max_steps: int = 0  # stop after this many optimizer steps (the schedule still spans the stage)
    resume: bool = False
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; fast: bf16 also on a CPU where it is faster
    compile: bool = False
    parallel: str = "ddp"  # ddp | fsdp (under torchrun)
    shards: str = ""  # overrides recipe data.shards_dir
    init: str = ""  # overrides the stage's init_from
    progress: bool = True


@dataclass
class MicroBatch:
    inputs: torch.Tensor  # (B, S)
    targets: torch.Tensor  # (B, S), IGNORE where no loss
    doc_ids: torch.Tensor | None  # (B, S) when attention is document-masked
    topk_ids: torch.Tensor | None = None  # (B, S, k) cached teacher top-k
    topk_logp: torch.Tensor | None = None
    rows: list[str] | None = None  # where each row comes from, for errors: "code@1056" (source@token offset)


# ------------------------------------------------------------------------------------------ the model


class StageModel(nn.Module):
    """The student plus the stage's objective, so DDP / FSDP / compile wrap one module whose forward
    returns the loss. The online teacher is held outside the module tree: it is frozen and never synced."""

    def __init__(self, student: Transformer, stage: StageConfig, teacher: Transformer | None = None):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list hides it from .parameters(), DDP and FSDP
        kd = stage.kd
        self.alpha = kd.alpha if kd is not None else 0.0
        self.temperature = kd.temperature if kd is not None else 1.0

    @property
    def teacher(self) -> Transformer | None:
        return self._teacher[0]

    def forward(self, inputs, targets, doc_ids=None, topk_ids=None, topk_logp=None, alpha: float | None = None):
        alpha = self.alpha if alpha is None else alpha
        hidden = self.student(inputs, doc_ids=doc_ids, return_hidden=True)
        teacher = None
        if alpha > 0:
            if topk_ids is not None:
                teacher = TeacherTargets(topk_ids=topk_ids, topk_logp=topk_logp)
            elif self.teacher is not None:
                with torch.no_grad():
                    t_hidden = self.teacher(inputs, doc_ids=doc_ids, return_hidden=True)
                # A student on a cut vocabulary (tokenizer ``SPEC:N``) learns the teacher's distribution
                # over the ids it has: the first N rows of the teacher's head, renormalised by the KD loss.
                teacher = TeacherTargets(hidden=t_hidden, weight=self.teacher.head_weight[:self.student.cfg.vocab_size])
        parts = head_loss(hidden, self.student.head_weight, targets, alpha=alpha, temperature=self.temperature,
                          teacher=teacher)
        return torch.stack([parts.loss, parts.ce_sum.to(parts.loss.dtype), parts.kd_sum.to(parts.loss.dtype)])


# ------------------------------------------------------------------------------------------------ data


class KDCache:
    """Top-k teacher log-probs beside the token shards (``mobilellm-r1 distill cache``): per source,
    ``ids.npy`` and ``logp.npy`` of shape ``(tokens, k)``, row t = the teacher's prediction after token t."""

    def __init__(self, root: str | Path, stage: StageConfig, tokenizer: str):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"no distillation cache at {self.root} (write it with `mobilellm-r1 distill cache`)")
        self.meta = json.loads(meta_path.read_text())
        for key, want in (("seq_len", stage.seq_len), ("doc_mask", stage.doc_mask), ("tokenizer", tokenizer)):
            if self.meta.get(key) != want:
                raise ConfigError(f"distillation cache {self.root} was written with {key}={self.meta.get(key)!r}, "
                                  f"the stage needs {want!r}")
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def rows(self, source: str, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        if source not in self._arrays:
            d = self.root / source
            if not (d / "ids.npy").is_file():
                raise ConfigError(f"distillation cache {self.root} has no source {source!r}")
            self._arrays[source] = (np.load(d / "ids.npy", mmap_mode="r"), np.load(d / "logp.npy", mmap_mode="r"))
        ids, logp = self._arrays[source]
        return ids[start:start + length], logp[start:start + length]


class MixtureBatches:
    """Micro-batches for pre-/mid-training from the mixture sampler (this rank's share of the schedule)."""

    def __init__(self, sampler, micro_batch: int, doc_mask: bool, kd_cache: KDCache | None = None):
        self.sampler, self.micro_batch, self.doc_mask, self.kd_cache = sampler, micro_batch, doc_mask, kd_cache

    def __iter__(self) -> Iterator[MicroBatch]:
        return self

    def __next__(self) -> MicroBatch:
        b = self.sampler.next_batch(self.micro_batch)
        tokens = torch.from_numpy(b.tokens)
        doc = torch.from_numpy(b.doc_ids).long() if self.doc_mask else None
        inputs, targets = next_token_targets(tokens, doc)
        mb = MicroBatch(inputs, targets, doc[:, :-1] if doc is not None else None,
                        rows=[f"{s}@{int(st)}" for s, st in zip(b.sources, b.starts)])
        if self.kd_cache is not None:
            s = inputs.shape[1]
            rows = [self.kd_cache.rows(src, int(st), s) for src, st in zip(b.sources, b.starts)]
            mb.topk_ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
            mb.topk_logp = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.float32))
        return mb

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


# -------------------------------------------------------------------------------------------- helpers


def load_model_spec(spec: str, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[Transformer, dict[str, Any]]:
    """A model named by a user: our checkpoint directory, a HF directory, a GGUF file or ``smollm2``."""
    from ..model.gguf import load_any

    return load_any(spec, device=device, dtype=dtype)


def teacher_reads(teacher_tok: str, data_tok: str) -> bool:
    """Whether a KD teacher reads the data's ids as its own: the same tokenizer, or the data's tokenizer is
    the teacher's cut to its first ids (``smollm2:8192`` under ``smollm2``), whose ids mean the same tokens."""
    from ..tokenizer import vocab_prefix_of

    cut = vocab_prefix_of(data_tok)
    return same_tokenizer(teacher_tok, data_tok) or (cut is not None and same_tokenizer(teacher_tok, cut[0]))


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two tokenizer specs give the same ids (same spec, or same vocabulary size and same ids on
    a probe text that exercises words, digits, whitespace, unicode and code)."""
    if a == b:
        return True
    from ..tokenizer import load_tokenizer

    ta, tb = load_tokenizer(a), load_tokenizer(b)
    probe = "The 3 quick brown foxes — naïve café, 12,345.67 ∑x²!\n\tdef f(x): return x ** 2  # 数学"
    return ta.vocab_size == tb.vocab_size and ta.encode(probe) == tb.encode(probe)


def total_steps(stage: StageConfig, max_steps: int, world: int, rows_per_epoch: int = 0) -> tuple[int, int]:
    """(optimizer steps the schedule spans, gradient-accumulation micro-batches per step). SFT stages
    count ``epochs`` over ``rows_per_epoch`` packed rows."""
    per_micro = stage.micro_batch_size * stage.seq_len * world
    accum = max(1, round(stage.global_batch_tokens / per_micro)) if stage.global_batch_tokens else 1
    steps = stage.steps
    if not steps and stage.tokens:
        steps = math.ceil(stage.tokens / (per_micro * accum))
    if not steps and stage.epochs and rows_per_epoch:
        steps = math.ceil(stage.epochs * rows_per_epoch / (stage.micro_batch_size * world * accum))
    steps = steps or max_steps
    if steps <= 0:
        raise ConfigError("the stage sets neither steps nor tokens: give it `steps` or pass --max-steps")
    return steps, accum


def make_optimizer(model: nn.Module, stage: StageConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (embedding included) and none on norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # fused on CPU too: measured 70 -> 14 ms per step on the tiny preset (foreach), 333 -> 73 ms at 140m
    return torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(stage.betas), eps=stage.eps, fused=True)


def _state_dict_options(full: bool = True, broadcast: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=True, broadcast_from_rank0=broadcast)


def gather_state(model: nn.Module, optim: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts by parameter name (rank 0 holds them under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _state_dict_options()
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optim, options=opts)


def restore_state(model: nn.Module, optim: torch.optim.Optimizer, msd: dict, osd: dict, info: D.DistInfo) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    opts = _state_dict_options(broadcast=info.enabled)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, optim, osd, options=opts)


def _unwrap(model: nn.Module) -> StageModel:
    return model.module if hasattr(model, "module") else model


def describe_rows(micro: list[MicroBatch], limit: int = 8) -> str:
    """A step's rows for an error: how many per source, then the first ``limit`` rows."""
    from collections import Counter

    rows = [r for mb in micro for r in (mb.rows or [])]
    if not rows:
        return "unknown"
    counts = Counter(r.split("@")[0] for r in rows)
    more = f", ... ({len(rows) - limit} more)" if len(rows) > limit else ""
    return ", ".join(f"{s} x{n}" for s, n in counts.items()) + " [" + ", ".join(rows[:limit]) + more + "]"


def resume_point(out: Path) -> str:
    """The checkpoint ``--resume`` would start from, for messages."""
    found = ckpt.list_checkpoints(out)
    return str(found[-1][1]) if found else "the beginning (no checkpoint yet)"


# --------------------------------------------------------------------------------------------- train


def build_student(recipe: Recipe, stage_name: str, stage: StageConfig, opts: TrainOptions,
                  device: torch.device) -> tuple[Transformer, str]:
    """The model a stage starts from: ``init`` / ``init_from`` (an earlier stage of this run, or a
    checkpoint a user names), else a fresh initialisation from the recipe's ``[model]`` and seed."""
    src = opts.init or stage.init_from
    if src and src in recipe.stages:
        path = Path(opts.out).parent / src / "final"
        if not path.is_dir():
            raise ConfigError(f"stage {stage_name!r} starts from stage {src!r}, but {path} does not exist yet "
                              f"(train {src!r} first)")
        src = str(path)
    if src:
        model, meta = load_model_spec(src, device="cpu", dtype=torch.float32)
        tok = meta.get("tokenizer") or recipe.data.tokenizer
    else:
        torch.manual_seed(recipe.run.seed)
        model, tok = Transformer(recipe.model), recipe.data.tokenizer
    if stage.rope_theta_scale != 1.0:  # e.g. x8 for the 32k reasoning SFT (Table 2)
        model.set_rope(recipe.model.rope_theta * stage.rope_theta_scale, max(model.cfg.max_seq_len, stage.seq_len))
    if stage.seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"stage {stage_name!r} trains on {stage.seq_len} tokens, beyond the model's "
                          f"max_seq_len {model.cfg.max_seq_len}")
    return model.to(device).train(), tok


def _shards_dir(recipe: Recipe, opts: TrainOptions) -> Path:
    raw = opts.shards or recipe.data.shards_dir
    if not raw:
        raise ConfigError("no token shards: set data.shards_dir in the recipe or pass --shards")
    p = Path(raw)
    if not p.is_absolute():  # relative to the run directory (the stage's parent), else as given
        cands = [Path(opts.out).parent / p, p] + ([Path(recipe.path).parent / p] if recipe.path else [])
        p = next((c for c in cands if (c / "index.json").is_file()), p)
    if not (p / "index.json").is_file():
        raise ConfigError(f"{p} holds no token shards (write them with `mobilellm-r1 data tokenize`)")
    return p


def train_stage(recipe: Recipe, stage_name: str, opts: TrainOptions) -> dict[str, Any]:
    """Train one stage of ``recipe``. Returns a summary (also the last line of ``metrics.jsonl``).
    Holds ``opts.out``'s lock throughout (rank 0 for the job; re-entrant under `mobilellm-r1 run`)."""
    with run_lock(opts.out):
        return _train_stage(recipe, stage_name, opts)


def _train_stage(recipe: Recipe, stage_name: str, opts: TrainOptions) -> dict[str, Any]:
    from ..data.mixture import MixtureSampler
    from ..data.shards import ShardSet

    stage = recipe.stage(stage_name)
    if stage.kind == "grpo":
        raise ConfigError(f"stage {stage_name!r} is a GRPO stage: run it with `mobilellm-r1 grpo`")
    sft = stage.kind == "sft"  # same loop, conversations instead of the mixture sampler
    info = D.init_distributed(opts.device)
    dev = info.device
    out = Path(opts.out)
    student, model_tok = build_student(recipe, stage_name, stage, opts, dev)
    shards = None if sft else ShardSet(_shards_dir(recipe, opts))
    data_tok = (model_tok or recipe.data.tokenizer) if sft else shards.index["tokenizer"]

    # --- everything that can be wrong with the inputs fails here, before any training ------------------
    kd_cache, teacher = None, None
    if stage.kd is not None and stage.kd.alpha > 0:
        if stage.kd.top_k > 0:
            if shards is None:
                raise ConfigError(f"[stages.{stage_name}.kd]: a top-k cache needs token shards; SFT distils online")
            kd_cache = KDCache(stage.kd.cache or Path(shards.root) / "kd", stage, data_tok)
        else:
            if not stage.kd.teacher:
                raise ConfigError(f"[stages.{stage_name}.kd] needs a teacher (or top_k > 0 with a cache)")
            teacher, tmeta = load_model_spec(stage.kd.teacher, device="cpu", dtype=torch.float32)
            t_tok = tmeta.get("tokenizer", "")
            if not t_tok or not teacher_reads(t_tok, data_tok):
                raise ConfigError(f"KD teacher {stage.kd.teacher!r} uses tokenizer {t_tok or 'unknown'!r}, but the "
                                  f"stage's data is tokenized with {data_tok!r}: distillation needs the same ids "
                                  "(or the teacher's tokenizer cut to its first ids, e.g. 'smollm2:8192')")
            if teacher.cfg.vocab_size < student.cfg.vocab_size:
                raise ConfigError(f"KD teacher {stage.kd.teacher!r} has {teacher.cfg.vocab_size} ids, fewer than the "
                                  f"student's {student.cfg.vocab_size}")
            teacher.requires_grad_(False)
            teacher = teacher.to(dev).eval()
    if sft:
        from ..posttrain.sft_data import build_sft_batches
        from ..tokenizer import load_tokenizer

        data_vocab = load_tokenizer(data_tok).vocab_size
        batches, sft_stats = build_sft_batches(recipe, stage, data_tok, out.parent, info.rank, info.world_size)
    else:
        data_vocab = shards.index["vocab_size"]
    if data_vocab > student.cfg.vocab_size:
        raise ConfigError(f"the data's tokenizer {data_tok!r} has {data_vocab} ids, more than the "
                          f"model's vocabulary {student.cfg.vocab_size}")
    if model_tok and model_tok != data_tok and not same_tokenizer(model_tok, data_tok):
        raise ConfigError(f"the model was trained with tokenizer {model_tok!r}, the data uses {data_tok!r}")
    steps_total, accum = total_steps(stage, opts.max_steps, info.world_size,
                                     batches.rows_per_epoch if sft else 0)
    run_until = min(steps_total, opts.max_steps) if opts.max_steps else steps_total
    existing = ckpt.list_checkpoints(out)
    if existing and not opts.resume:
        raise ConfigError(f"{out} already holds checkpoints (newest step {existing[-1][0]}): pass --resume to "
                          "continue, or choose another --out")

    def sampler(split: str, rank_seed: int = 0) -> MixtureSampler:
        return MixtureSampler(shards, stage.mixture or {s: 1.0 for s in shards.sources}, seq_len=stage.seq_len,
                              seed=recipe.run.seed + rank_seed, rank=info.rank, world_size=info.world_size,
                              split=split if recipe.data.heldout_fraction > 0 else "all",
                              heldout_fraction=recipe.data.heldout_fraction)

    if not sft:
        batches = MixtureBatches(sampler("train"), stage.micro_batch_size, stage.doc_mask, kd_cache)

    # --- model, wrapping, optimizer --------------------------------------------------------------------
    core = StageModel(student, stage, teacher)
    autocast = use_bf16_autocast(opts.dtype, dev)
    if opts.compile:
        from .objectives import set_compile

        for blk in student.layers:
            blk.compile()
        set_compile(True)
    model = D.wrap(core, info, opts.parallel, list(student.layers))
    optim = make_optimizer(model, stage, dev)

    start_step, tokens_seen = 0, 0
    guard = NonFiniteGuard(stage.nonfinite, stage.nonfinite_max_skips)
    if opts.resume and existing:
        last_step, path = existing[-1]
        loaded = ckpt.load_checkpoint(path)
        st = loaded["state"]
        if st.get("stage") != stage_name or st.get("world_size") != info.world_size:
            raise CheckpointError(f"checkpoint {path} is from stage {st.get('stage')!r} with "
                                  f"{st.get('world_size')} ranks; this run is stage {stage_name!r} with "
                                  f"{info.world_size}")
        msd = {f"student.{k}": v for k, v in loaded["model"].items()}
        restore_state(model, optim, msd, loaded["optim"], info)
        batches.load_state_dict(st["samplers"][info.rank])
        ckpt.set_rng_state(loaded["rng"][info.rank])
        start_step, tokens_seen = st["step"], st.get("tokens", 0)
        guard.skips = st.get("nonfinite_skips", 0)

    log = MetricsLog(out, info.is_main, resume_step=start_step if opts.resume else None)
    peak, peak_src = device_peak(dev, bf16=autocast)
    fpt = flops_per_token(student.cfg, stage.seq_len)
    step_tokens = stage.micro_batch_size * stage.seq_len * accum * info.world_size

    def forward(mb: MicroBatch, alpha: float | None = None) -> torch.Tensor:
        args = [t.to(dev, non_blocking=True) if t is not None else None
                for t in (mb.inputs, mb.targets, mb.doc_ids, mb.topk_ids, mb.topk_logp)]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            return model(*args, alpha=alpha)

    def heldout_loss() -> float | None:
        if sft or recipe.data.heldout_fraction <= 0 or stage.eval_batches <= 0:
            return None
        ev = MixtureBatches(sampler("heldout"), stage.micro_batch_size, stage.doc_mask)
        sums = torch.zeros(2, dtype=torch.float64)
        model.eval()
        with torch.no_grad():
            for _ in range(stage.eval_batches):
                try:
                    mb = next(ev)
                except StopIteration:
                    break
                out3 = forward(mb, alpha=0.0)
                sums += torch.tensor([float(out3[1]), float((mb.targets != IGNORE).sum())], dtype=torch.float64)
        model.train()
        s = D.all_reduce_sum(sums, info)
        return float(s[0] / max(s[1], 1))

    def save(step: int) -> None:
        msd, osd = gather_state(model, optim)
        # A finite loss can still be followed by an update that overflows the weights: never checkpoint those.
        bad = info.is_main and not ckpt.all_finite(msd)  # decided on rank 0 (FSDP gathers there), agreed by all
        if D.all_reduce_sum([float(bad)], info)[0] > 0:
            raise NonFiniteError(f"step {step}: the weights are not finite after this step's update (the loss "
                                 f"was finite): not saved; --resume starts from {resume_point(out)}. Lower the lr")
        samplers = D.gather_objects(batches.state_dict(), info)
        rngs = D.gather_objects(ckpt.rng_state(), info)
        if info.is_main:
            tensors = {k.removeprefix("student."): v for k, v in msd.items()}
            ckpt.save_checkpoint(out, step, model_state=tensors, cfg=student.cfg, tokenizer=model_tok or data_tok,
                                 optim_state=osd, rng_states=rngs, keep=stage.keep_checkpoints,
                                 trainer_state={"stage": stage_name, "world_size": info.world_size,
                                                "tokens": tokens_seen, "samplers": samplers,
                                                "steps_total": steps_total, "accum": accum,
                                                "nonfinite_skips": guard.skips})
        D.barrier(info)

    summary: dict[str, Any] = {"stage": stage_name, "kind": stage.kind, "steps_total": steps_total,
                               "accum": accum, "world_size": info.world_size, "device": str(dev),
                               "step_tokens": step_tokens, "flops_per_token": fpt, "peak_flops": peak,
                               "autocast": "bfloat16" if autocast else None,
                               "peak_source": peak_src, "resumed_from": start_step if opts.resume else None}
    if sft:  # what was read, kept and skipped (no assistant turn / longer than a row)
        summary["sft_data"] = {**sft_stats.as_dict(), "rows": batches.rows_per_epoch, "packing": stage.packing}
    if start_step == 0:
        h0 = heldout_loss()
        summary["heldout_loss_initial"] = h0
        if h0 is not None:
            log.log({"step": 0, "heldout_loss": h0})

    bar = None
    if opts.progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=run_until, initial=start_step, desc=stage_name, unit="step", dynamic_ncols=True)
    losses, rates = [], []
    step = start_step
    watch = PreemptionWatch().start()  # from here SIGTERM/SIGUSR1 end the step, checkpoint and stop
    try:
        while step < run_until:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            kept = D.all_reduce_sum([float(sum(int((m.targets != IGNORE).sum()) for m in micro))], info)[0]
            scale = info.world_size / max(float(kept), 1.0)
            sums = torch.zeros(3, dtype=torch.float64)
            for i, mb in enumerate(micro):
                with D.no_grad_sync(model, skip=i < accum - 1):
                    out3 = forward(mb)
                    (out3[0] * scale).backward()
                sums += out3.detach().double().cpu()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                         stage.grad_clip if stage.grad_clip > 0 else float("inf")))
            tot = D.all_reduce_sum(sums, info) / max(float(kept), 1.0)  # the same on every rank, as is gnorm
            loss = float(tot[0])
            lr = lr_at(step, steps_total, stage)
            finite = math.isfinite(loss) and math.isfinite(gnorm)
            if not finite:  # raises, or counts a skip: this step's update is dropped
                guard.on_nonfinite(step + 1, loss, gnorm, describe_rows(micro), resume_point(out))
            else:
                for g in optim.param_groups:
                    g["lr"] = lr
                optim.step()
            optim.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            step += 1
            tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            losses.append(loss)
            rates.append(step_tokens / dt)
            rec = {"step": step, "loss": loss, "ce": float(tot[1]), "lr": lr, "grad_norm": gnorm,
                   "tokens": tokens_seen, "tokens_per_s": step_tokens / dt,
                   "mfu": (fpt * step_tokens / dt / info.world_size / peak) if peak else None}
            if stage.kd is not None and stage.kd.alpha > 0:
                rec["kd"] = float(tot[2])
            if guard.skips:
                rec["nonfinite_skips"] = guard.skips
            if step % max(1, stage.log_every) == 0 or step == run_until or not finite:
                log.log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}")
            if stage.eval_every and step % stage.eval_every == 0 and step < run_until:
                h = heldout_loss()
                if h is not None:
                    log.log({"step": step, "heldout_loss": h})
            stop = D.all_reduce_sum([float(watch.signame is not None)], info)[0] > 0  # every rank stops together
            if (stage.save_every and step % stage.save_every == 0) or step == run_until or stop:
                save(step)
            if stop and step < run_until:
                log.close()
                raise Preempted(watch.signame or "a signal to another rank", step,
                                ckpt.checkpoints_dir(out) / f"step_{step:08d}")
    finally:
        watch.stop()
        if bar is not None:
            bar.close()

    h1 = heldout_loss()
    if h1 is not None:
        log.log({"step": step, "heldout_loss": h1})
    if info.is_main:  # the stage's result, for the next stage's init_from and for export
        ckpt.publish_final(ckpt.list_checkpoints(out)[-1][1], out / "final")
    steady = rates[1:] or rates
    tps = float(np.mean(steady)) if steady else 0.0
    summary.update({"steps": step, "final_loss": losses[-1] if losses else None, "losses": losses,
                    "tokens_per_s": tps, "mfu": (fpt * tps / info.world_size / peak) if peak and tps else None,
                    "heldout_loss_final": h1, "out": str(out), "checkpoint": str(out / "final")})
    log.log({"step": step, "summary": {k: v for k, v in summary.items() if k != "losses"}})
    log.close()
    D.barrier(info)
    return summary

