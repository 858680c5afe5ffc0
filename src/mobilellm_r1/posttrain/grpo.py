"""GRPO with verifiable rewards (paper section 7.4; Shao et al. 2024).

Per step: ``prompts_per_step`` prompts, ``group_size`` sampled completions each (our batched KV-cache
generator), a reward per completion from a grader — the math grader on the final answer, or the code
sandbox on the prompt's stdin/stdout tests — and the group-normalised advantage

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)                                   (GRPO Eq. 3)

shared by every token of completion i. The loss is the clipped policy-ratio objective, averaged over each
completion's tokens and then over completions, minus a KL penalty to a reference model:

    L = -1/G sum_i 1/|o_i| sum_t [ min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) - beta KL_t ]
    rho_t = pi(o_t | ..) / pi_old(o_t | ..),  KL_t = exp(q_t) - q_t - 1 with q_t = log pi_ref - log pi

(the unbiased "k3" estimator). ``kl_beta`` defaults to 0 as in the paper, which then needs no reference
model. With ``updates_per_batch = 1`` (the default) pi_old is the policy itself, so rho = 1 and the
gradient is the advantage-weighted policy gradient; more updates per batch make the clip bite.

Two DAPO options (Yu et al. 2025): ``dynamic_sampling`` drops groups whose rewards all agree (zero
advantage) and draws more prompts to fill the step; ``loss_norm = "token"`` averages over all the step's
tokens instead of per completion.

Each step logs mean reward (over every rollout drawn) and mean completion length (the paper's Figure 10
curves), the KL, the fraction of clipped tokens, the sampled tokens' mean negative log-probability (an
entropy estimate), the share of zero-variance groups, lr, gradient norm and throughput to
``metrics.jsonl``. Single process.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, GRPOConfig, Recipe
from ..model.io import atomic_dir, model_tensors
from ..model.transformer import Transformer
from .formats import SFTFormatError, prompt_and_answer


@dataclass
class GRPOOptions:
    out: str
    max_steps: int = 0
    resume: bool = False
    device: str = "auto"
    init: str = ""  # overrides the stage's init_from
    progress: bool = True
    dtype: str = "auto"  # the policy's forward/backward precision, as `train --dtype` (generation stays fp32)


# ------------------------------------------------------------------------------------------- rewards


def math_reward(completion: str, gold: str) -> float:
    """1 for the right answer in a closed ``\\boxed{}``, else 0: the grader alone would also take "the answer
    is N" or the last number, so a truncated ramble whose last number happens to match would be rewarded
    for no format at all."""
    from ..eval.grading.math import grade_boxed

    return float(grade_boxed(completion, gold)["correct"])


def code_reward(completion: str, gold: str) -> float:
    """``gold``: JSON list of ``[stdin, expected stdout]`` cases, run in the code sandbox."""
    from ..eval.grading.code import check_io
    from ..eval.tasks.humaneval import extract_code

    return float(check_io(extract_code(completion), [tuple(c) for c in json.loads(gold)], timeout=10.0).status
                 == "passed")


REWARDS: dict[str, Callable[[str, str], float]] = {"math": math_reward, "code": code_reward}


# --------------------------------------------------------------------------------------------- maths


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(P, G)`` rewards → advantages normalised within each prompt's group (0 where all agree)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def _chunk_logp(h: torch.Tensor, w: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax((h @ w.t()).float(), dim=-1).gather(1, tgt[:, None]).squeeze(1)


def token_logprobs(model: Transformer, seqs: list[list[int]], starts: list[int], pad_id: int,
                   chunk: int = 256) -> list[torch.Tensor]:
    """Log-probabilities of ``seq[starts:]`` (the completion) given what precedes, per sequence. Rows are
    right-padded (causal attention keeps padding out of real tokens); the head runs in checkpointed chunks
    so no ``(tokens, vocab)`` logits are kept for the backward pass."""
    dev = model.embed_tokens.weight.device
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    hidden = model(ids.to(dev), return_hidden=True)
    rows = [(i, t) for i, (s, st) in enumerate(zip(seqs, starts)) for t in range(st - 1, len(s) - 1)]
    bi = torch.tensor([r[0] for r in rows], device=dev)
    ti = torch.tensor([r[1] for r in rows], device=dev)
    h, tgt = hidden[bi, ti], ids.to(dev)[bi, ti + 1]
    w = model.head_weight
    parts = [checkpoint(_chunk_logp, h[i:i + chunk], w, tgt[i:i + chunk], use_reentrant=False)
             if torch.is_grad_enabled() else _chunk_logp(h[i:i + chunk], w, tgt[i:i + chunk])
             for i in range(0, len(rows), chunk)]
    flat = torch.cat(parts)
    return list(flat.split([len(s) - st for s, st in zip(seqs, starts)]))


def grpo_loss(logp: list[torch.Tensor], old_logp: list[torch.Tensor], adv: torch.Tensor, clip_eps: float,
              beta: float = 0.0, ref_logp: list[torch.Tensor] | None = None, n_total: int | None = None,
              n_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO loss (module docstring) summed over these completions, divided by ``n_total``
    (all completions of the step, so micro-batches add up to the mean). With ``n_tokens`` (all completion
    tokens of the step) the loss is token-level instead (DAPO, Yu et al. 2025, section 3.3): every token's
    term summed and divided by ``n_tokens``, so a long completion weighs by its length, not 1/G."""
    n_total = n_total or len(logp)
    loss = logp[0].new_zeros(())
    kl_sum, clipped, tokens, nll = 0.0, 0, 0, 0.0
    for lp, old, a, *ref in zip(logp, old_logp, adv, *([ref_logp] if ref_logp is not None else [])):
        ratio = torch.exp(lp - old)
        surr = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
        per_tok = -surr
        if ref:
            q = ref[0] - lp
            kl = torch.exp(q) - q - 1
            kl_sum += float(kl.detach().mean())
            if beta:
                per_tok = per_tok + beta * kl
        loss = loss + (per_tok.sum() / n_tokens if n_tokens else per_tok.mean() / n_total)
        clipped += int(((ratio - 1).abs() > clip_eps).sum())
        tokens += len(lp)
        nll -= float(lp.detach().sum())
    # nll: mean -log pi of the sampled tokens, a free Monte-Carlo estimate of the policy's per-token entropy
    # (exact in expectation at temperature 1): the sharpening/entropy-collapse signal
    return loss, {"kl": kl_sum / len(logp) if ref_logp is not None else 0.0,
                  "clip_frac": clipped / max(tokens, 1), "nll": nll / max(tokens, 1)}


# ------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptSet:
    ids: list[list[int]]
    gold: list[str]
    stats: dict[str, Any]
    strata: list[str] | None = None  # each prompt's value of GRPOConfig.stratify


def prompt_order(n: int, rng: np.random.Generator, strata: list[str] | None = None) -> np.ndarray:
    """One epoch's prompt order: a permutation, or with ``strata`` a stratified one in which every window
    holds each stratum in proportion to its size. Stratum k's prompts (shuffled) sit at (j + u_k) / n_k,
    j = 0..n_k-1, with one random offset u_k per stratum (systematic sampling), and the order is by
    position, so any window of w prompts has w * n_k / n of stratum k, give or take one."""
    if not strata:
        return rng.permutation(n)
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(strata):
        groups.setdefault(k, []).append(i)
    keys, idx = [], []
    for k in sorted(groups):
        members = rng.permutation(groups[k])
        keys += ((np.arange(len(members)) + rng.random()) / len(members)).tolist()
        idx += members.tolist()
    return np.asarray(idx)[np.argsort(keys, kind="stable")]


def load_prompts(recipe: Recipe, stage_name: str, tok, cfg: GRPOConfig, run_dir: Path) -> PromptSet:
    """The stage's prompts rendered with the chat template (generation prompt appended) and their gold
    answers; prompts longer than ``max_prompt_tokens`` are skipped and counted."""
    from ..eval.tasks.code_io import test_cases
    from .sft_data import dataset_inputs, iter_rows

    stage = recipe.stage(stage_name)
    if not stage.datasets:
        raise ConfigError(f"[stages.{stage_name}] needs `datasets` (prompt sets with gold answers or tests)")
    ids, gold, strata = [], [], []
    stats = {"rows": 0, "prompts": 0, "too_long": 0}
    for name in stage.datasets:
        n = 0
        for path in dataset_inputs(recipe, name, run_dir):
            for where, row in iter_rows(path):
                stats["rows"] += 1
                try:
                    msgs, answer = prompt_and_answer(row, where)
                    if cfg.reward == "code":
                        answer = json.dumps(test_cases(row))
                except (SFTFormatError, KeyError, TypeError, ValueError) as e:
                    raise ConfigError(f"{where}: not a GRPO prompt ({e})") from None
                if cfg.stratify and not (isinstance(row, dict) and cfg.stratify in row):
                    raise ConfigError(f"{where}: no field {cfg.stratify!r} to stratify the GRPO prompts by "
                                      f"([stages.{stage_name}.grpo] stratify)")
                if stage.system_prompt not in ("auto", "none") and not any(m["role"] == "system" for m in msgs):
                    msgs = [{"role": "system", "content": stage.system_prompt}] + msgs
                p = tok.apply_chat_template(msgs, add_generation_prompt=True)
                if len(p) > cfg.max_prompt_tokens:
                    stats["too_long"] += 1
                    continue
                ids.append(p)
                gold.append(answer)
                if cfg.stratify:
                    strata.append(str(row[cfg.stratify]))
                n += 1
                if stage.max_samples and n >= stage.max_samples:
                    break
            if stage.max_samples and n >= stage.max_samples:
                break
    if not ids:
        raise ConfigError(f"no usable GRPO prompt in {', '.join(stage.datasets)} ({stats['too_long']} too long)")
    stats["prompts"] = len(ids)
    if cfg.stratify:
        stats["strata"] = {k: strata.count(k) for k in sorted(set(strata))}
    return PromptSet(ids, gold, stats, strata or None)


# --------------------------------------------------------------------------------------------- train


def train_grpo(recipe: Recipe, stage_name: str, opts: GRPOOptions) -> dict[str, Any]:
    """Run a ``kind = "grpo"`` stage. Returns a summary (also the last line of ``metrics.jsonl``)."""
    from ..faults import NonFiniteGuard, PreemptionWatch, Preempted
    from ..model.engine import EngineConfig, Request
    from ..model.engine import run as run_engine
    from ..tokenizer import load_tokenizer
    from ..train import checkpoint as ckpt
    from ..train.distributed import pick_device
    from ..train.loop import TrainOptions, build_student, load_model_spec, make_optimizer, resume_point
    from ..train.metrics import MetricsLog, use_bf16_autocast
    from ..train.schedule import lr_at

    stage = recipe.stage(stage_name)
    if stage.kind != "grpo":
        raise ConfigError(f"stage {stage_name!r} is a {stage.kind!r} stage, not grpo")
    cfg = stage.grpo or GRPOConfig()
    if cfg.reward not in REWARDS:
        raise ConfigError(f"[stages.{stage_name}.grpo] reward {cfg.reward!r} is not one of {sorted(REWARDS)}")
    if cfg.loss_norm not in ("sequence", "token"):
        raise ConfigError(f"[stages.{stage_name}.grpo] loss_norm {cfg.loss_norm!r} is not one of ['sequence', 'token']")
    if cfg.max_sample_rounds < 1:
        raise ConfigError(f"[stages.{stage_name}.grpo] max_sample_rounds must be >= 1")
    if cfg.engine not in ("ours", "vllm"):
        raise ConfigError(f"[stages.{stage_name}.grpo] engine {cfg.engine!r} is not one of ['ours', 'vllm']")
    if cfg.engine == "vllm":
        from ..model.vllm_backend import INSTALL_HINT, vllm_available

        if not vllm_available():
            raise ConfigError(f"[stages.{stage_name}.grpo] engine = 'vllm': {INSTALL_HINT}")
    if cfg.kl_beta > 0 and not cfg.reference:
        raise ConfigError(f"[stages.{stage_name}.grpo] kl_beta > 0 needs a reference ('init' or a model)")
    dev = pick_device(opts.device)
    out = Path(opts.out)
    policy, tok_spec = build_student(recipe, stage_name, stage, TrainOptions(out=opts.out, init=opts.init), dev)
    tok_spec = tok_spec or recipe.data.tokenizer
    tok = load_tokenizer(tok_spec)
    if tok.chat is None:
        raise ConfigError(f"tokenizer {tok_spec!r} has no chat format: GRPO prompts need one")
    prompts = load_prompts(recipe, stage_name, tok, cfg, out.parent)
    if cfg.max_prompt_tokens + cfg.max_new_tokens > policy.cfg.max_seq_len:
        raise ConfigError(f"max_prompt_tokens + max_new_tokens = {cfg.max_prompt_tokens + cfg.max_new_tokens} "
                          f"exceeds the model's max_seq_len {policy.cfg.max_seq_len}")
    ref = None
    if cfg.reference:
        ref = copy.deepcopy(policy) if cfg.reference == "init" else \
            load_model_spec(cfg.reference, device=dev, dtype=torch.float32)[0]
        ref.requires_grad_(False).eval()
    reward_fn = REWARDS[cfg.reward]
    steps_total = stage.steps or opts.max_steps
    if steps_total <= 0:
        raise ConfigError(f"[stages.{stage_name}] sets no `steps`: give it steps or pass --max-steps")
    run_until = min(steps_total, opts.max_steps) if opts.max_steps else steps_total
    optim = make_optimizer(policy, stage, dev)
    stop_ids = sorted({i for i in list(tok.eos_ids) + list(policy.cfg.eos_ids) if 0 <= i < policy.cfg.vocab_size})
    pad = policy.cfg.pad_id if 0 <= policy.cfg.pad_id < policy.cfg.vocab_size else 0
    micro = max(1, stage.micro_batch_size)
    autocast = use_bf16_autocast(opts.dtype, dev)

    state = {"epoch": 0, "pos": 0}
    replay: list[list] = []  # [step, prompt indices, engine seed] of each round of the first replay_steps steps
    # Per-step means since step 1, kept in the checkpoint so that a resumed run's summary (and the scorecard's
    # first / last three steps, and the replay's pair) covers the steps before the resume too.
    hist: dict[str, list[float]] = {"reward_mean": [], "completion_len_mean": [], "truncated": []}
    existing = ckpt.list_checkpoints(out)
    if existing and not opts.resume:
        raise ConfigError(f"{out} already holds checkpoints (newest step {existing[-1][0]}): pass --resume to "
                          "continue, or choose another --out")
    step = 0
    guard = NonFiniteGuard(stage.nonfinite, stage.nonfinite_max_skips)
    if opts.resume and existing:
        loaded = ckpt.load_checkpoint(existing[-1][1])
        policy.load_state_dict(loaded["model"], strict=False)  # tied head: stored once
        optim.load_state_dict(loaded["optim"])
        ckpt.set_rng_state(loaded["rng"][0])
        state = loaded["state"]["prompts"]
        replay = loaded["state"].get("replay", [])
        hist = loaded["state"].get("history", hist)
        step = loaded["state"]["step"]
        guard.skips = loaded["state"].get("nonfinite_skips", 0)
    log = MetricsLog(out, True, resume_step=step if opts.resume else None)

    def order(epoch: int) -> np.ndarray:
        return prompt_order(len(prompts.ids), np.random.default_rng([recipe.run.seed, epoch]), prompts.strata)

    def next_prompts(count: int) -> list[int]:
        picked = []
        while len(picked) < count:
            perm = order(state["epoch"])
            take = perm[state["pos"]:state["pos"] + count - len(picked)]
            picked += take.tolist()
            state["pos"] += len(take)
            if state["pos"] >= len(perm):
                state["epoch"], state["pos"] = state["epoch"] + 1, 0
        return picked

    def save(step: int) -> None:
        ckpt.save_checkpoint(out, step, model_state={k: v.cpu() for k, v in model_tensors(policy).items()},
                             cfg=policy.cfg, tokenizer=tok_spec, optim_state=optim.state_dict(),
                             rng_states=[ckpt.rng_state()], keep=stage.keep_checkpoints,
                             trainer_state={"stage": stage_name, "prompts": dict(state), "steps_total": steps_total,
                                            "nonfinite_skips": guard.skips, "replay": replay,
                                            "history": hist})

    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=run_until, initial=step, desc=stage_name, unit="step", dynamic_ncols=True)
    vllm = None
    if cfg.engine == "vllm":
        from ..model.vllm_backend import VLLMEngine, VLLMOptions

        # old log-probs for the ratio still come from the policy itself (token_logprobs), never from vLLM
        vllm = VLLMEngine(policy, VLLMOptions(max_model_len=policy.cfg.max_seq_len, seed=recipe.run.seed))

    def sample(r_idx: list[int], seed: int) -> tuple[list[tuple[list[list[int]], list[str], list[float]]], int]:
        """The policy's G completions of each prompt in ``r_idx`` (ids, finish reasons, rewards) and the new
        tokens they took. One engine request per prompt: its group's G samples share one prefill; slots =
        the whole round's rollouts, so a finished sample's slot never waits for work."""
        G = cfg.group_size
        policy.eval()
        reqs = [Request(prompts.ids[i], cfg.max_new_tokens, n=G) for i in r_idx]
        ecfg = EngineConfig(slots=len(r_idx) * G, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                            stop_token_ids=stop_ids,
                            max_len=max(len(prompts.ids[i]) for i in r_idx) + cfg.max_new_tokens)
        if vllm is not None:  # the policy's current weights, through vLLM's own loader
            vllm.load_model_weights(policy)
            eng = vllm.run(reqs, ecfg)
        else:
            eng = run_engine(policy, reqs, ecfg)
        policy.train()
        groups = []
        for i, cs in zip(r_idx, eng.completions):
            c_ids = [c.token_ids if c.token_ids else [stop_ids[0]] for c in cs]
            c_why = [c.finish_reason for c in cs]
            texts = [tok.decode(c[:-1] if r == "stop_token" else c) for c, r in zip(c_ids, c_why)]
            groups.append((c_ids, c_why, [reward_fn(t, prompts.gold[i]) for t in texts]))
        return groups, eng.new_tokens

    watch = PreemptionWatch().start()  # SIGTERM/SIGUSR1: finish the step, checkpoint, raise Preempted
    try:
        while step < run_until:
            t0 = time.perf_counter()
            G = cfg.group_size
            idx, comps, rewards = [], [], []  # the groups this step trains on
            all_rewards, all_reasons, all_lens, new_tokens, t_gen, rounds = [], [], [], 0, 0.0, 0
            while True:  # one round unless dynamic_sampling tops up the groups whose rewards all agree
                t1 = time.perf_counter()
                r_idx = next_prompts(cfg.prompts_per_step - len(idx))
                seed = recipe.run.seed * 1_000_003 + step + 100_003 * rounds
                if step < cfg.replay_steps:
                    replay.append([step, r_idx, seed])
                groups, n_new = sample(r_idx, seed)
                t_gen += time.perf_counter() - t1
                new_tokens += n_new
                rounds += 1
                for i, (c_ids, c_why, r) in zip(r_idx, groups):
                    all_rewards += r
                    all_reasons += c_why
                    all_lens += [len(c) for c in c_ids]
                    if cfg.dynamic_sampling and min(r) == max(r):
                        continue  # zero advantage for every sample: no gradient, only dilution
                    idx.append(i)
                    comps += c_ids
                    rewards += r
                if (not cfg.dynamic_sampling or len(idx) >= cfg.prompts_per_step
                        or rounds >= cfg.max_sample_rounds):
                    break
            rewards = torch.tensor(rewards, dtype=torch.float32)
            batch = [prompts.ids[i] for i in idx for _ in range(G)]
            adv = group_advantages(rewards.view(len(idx), G)).view(-1) if idx else rewards
            seqs = [p + c for p, c in zip(batch, comps)]
            starts = [len(p) for p in batch]
            n = len(seqs)
            old = None
            if cfg.updates_per_batch > 1:
                with torch.no_grad():
                    old = [lp for i in range(0, n, micro)
                           for lp in token_logprobs(policy, seqs[i:i + micro], starts[i:i + micro], pad)]
            refs = None
            if ref is not None:
                with torch.no_grad():
                    refs = [lp for i in range(0, n, micro)
                            for lp in token_logprobs(ref, seqs[i:i + micro], starts[i:i + micro], pad)]
            lr = lr_at(step, steps_total, stage)
            for g in optim.param_groups:
                g["lr"] = lr
            n_tok = sum(len(x) - st for x, st in zip(seqs, starts)) if cfg.loss_norm == "token" else None
            loss_sum, gnorm, info = 0.0, 0.0, {"kl": 0.0, "clip_frac": 0.0, "nll": 0.0}
            for _ in range(cfg.updates_per_batch if n else 0):  # no group with mixed rewards: no update
                loss_sum, info = 0.0, {"kl": 0.0, "clip_frac": 0.0, "nll": 0.0}
                for i in range(0, n, micro):
                    sl = slice(i, i + micro)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                        lp = token_logprobs(policy, seqs[sl], starts[sl], pad)
                    lp = [x.float() for x in lp]
                    o = old[sl] if old is not None else [x.detach() for x in lp]
                    loss, inf = grpo_loss(lp, o, adv[sl].to(dev), cfg.clip_eps, cfg.kl_beta,
                                          refs[sl] if refs is not None else None, n_total=n, n_tokens=n_tok)
                    loss.backward()
                    loss_sum += float(loss.detach())
                    w = len(lp) / n
                    info = {k: info[k] + w * inf[k] for k in info}
                gnorm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                             stage.grad_clip if stage.grad_clip > 0 else float("inf")))
                if not (np.isfinite(loss_sum) and np.isfinite(gnorm)):  # raises, or skips this update
                    guard.on_nonfinite(step + 1, loss_sum, gnorm, f"prompts {idx}", resume_point(out))
                    optim.zero_grad(set_to_none=True)
                    continue
                optim.step()
                optim.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            # reward, length and truncation over every rollout drawn this step (dynamic sampling's dropped
            # groups included): the policy's own reward, not the kept groups' (biased towards mixed ones)
            all_r = torch.tensor(all_rewards)
            mean_r = float(all_r.mean())
            mean_len = float(np.mean(all_lens))
            hist["reward_mean"].append(mean_r)
            hist["completion_len_mean"].append(mean_len)
            hist["truncated"].append(sum(r == "length" for r in all_reasons) / len(all_reasons))
            rec = {"step": step, "reward_mean": mean_r, "reward_std": float(all_r.std(unbiased=False)),
                   "completion_len_mean": mean_len, "loss": loss_sum, "kl": info["kl"],
                   "clip_frac": info["clip_frac"], "token_nll": info["nll"],
                   "zero_var_groups": float((all_r.view(-1, G).std(1, unbiased=False) == 0).float().mean()),
                   "groups_trained": len(idx), "sample_rounds": rounds,
                   "lr": lr, "grad_norm": gnorm,
                   "samples_per_s": len(all_rewards) / dt,
                   "gen_tokens_per_s": new_tokens / t_gen if t_gen > 0 else None,
                   "truncated": hist["truncated"][-1]}
            log.log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{mean_r:.3f}", len=f"{mean_len:.0f}", samples_s=f"{len(all_rewards) / dt:.1f}")
            if (stage.save_every and step % stage.save_every == 0) or step == run_until or watch.signame:
                save(step)
            if watch.signame and step < run_until:
                log.close()
                raise Preempted(watch.signame, step, ckpt.checkpoints_dir(out) / f"step_{step:08d}")
        # The paired measure (GRPOConfig.replay_steps): the final policy on the first steps' prompts and seeds.
        replay_r: dict[int, list[float]] = {}
        for k, r_idx, seed in replay:
            groups, _ = sample(r_idx, seed)
            replay_r.setdefault(k, []).extend(x for _, _, r in groups for x in r)
        reward_replay = [float(np.mean(replay_r[k])) for k in sorted(replay_r)]
        if reward_replay:
            log.log({"step": step, "reward_replay": reward_replay})
    finally:
        watch.stop()
        if vllm is not None:
            vllm.close()
        if bar is not None:
            bar.close()
    newest = ckpt.list_checkpoints(out)[-1][1]
    with atomic_dir(out / "final") as tmp:
        for name in ("model.safetensors", "config.json", ckpt.STATE):
            shutil.copy2(newest / name, tmp / name)
    summary = {"stage": stage_name, "kind": "grpo", "steps": step, "steps_total": steps_total,
               "prompts_per_step": cfg.prompts_per_step, "group_size": cfg.group_size, "kl_beta": cfg.kl_beta,
               "prompt_data": prompts.stats, **hist, "reward_replay": reward_replay,
               "out": str(out), "checkpoint": str(out / "final")}
    log.log({"step": step, "summary": {k: v for k, v in summary.items()
                                       if k not in ("reward_mean", "completion_len_mean", "truncated",
                                                    "reward_replay")}})
    log.close()
    return summary
