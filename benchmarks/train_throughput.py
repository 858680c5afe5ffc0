"""Training throughput: our training loop against ``transformers.Trainer`` on the same model, data and batch.

Both sides train the same initial weights (our ``Transformer`` built with the recipe's seed, as
``train_stage`` builds it; HF's ``Llama4ForCausalLM`` loaded from its HF export) on the same sequences
(real text, the CPython standard library, tokenized with SmolLM2's 49,152-id tokenizer, drawn by a
``MixtureSampler`` with the same seed, weights and length), on CPU in fp32, with the same AdamW
hyper-parameters (lr 1e-3, betas 0.9/0.95, eps 1e-8, weight decay 0.1, clipping 1.0, 2 warm-up steps then
linear decay), the same thread count, no evaluation and no intermediate checkpoint.
With ``--device cuda`` both sides train on the GPU under bf16 autocast (ours: ``dtype auto``; HF:
``bf16=True``), ``--compile`` compiles our blocks and sets HF's ``torch_compile``; CUDA steps are timed
after a device synchronisation on both sides, and MFU is against the GPU's bf16 datasheet peak.

- ours: ``train_stage`` on a one-stage recipe; tokens/s is the mean over the steps after the first (the
  summary's ``tokens_per_s``), each step timed from fetching its batch to the end of ``optimizer.step``.
- HF: ``Trainer`` with its defaults otherwise (``optim=adamw_torch_fused`` on torch >= 2.8, the model's
  default attention implementation); each row gives ``input_ids = tokens[:-1]`` and
  ``shift_labels = tokens[1:]`` (``ForCausalLMLoss`` uses them unshifted; ``remove_unused_columns=False``
  keeps them in the batch), so the targets are exactly ours and the first-step losses agree. Tokens/s is
  timed by a callback from ``on_step_begin`` to ``on_step_end`` (forward, backward, clipping, optimizer and
  scheduler step; HF fetches the batch before ``on_step_begin``), steps after the first; the JSON also gives
  the end-to-end rate (``on_step_end`` to ``on_step_end``: batch fetch and logging included, like ours).
- The schedules differ by one step in warm-up (ours: lr (s+1)/2 of the peak at step s < 2, HF: s/2), so
  only the first losses are comparable; both are taken before any update.

Each side runs in its own subprocess (the script re-invokes itself with ``--side ours|hf``) so that its peak
resident memory (``ru_maxrss``, imports included) is its own. MFU = tokens/s x ``flops_per_token`` / the
CPU's measured fp32 matmul peak at the same thread count (``metrics.device_peak``), one measurement for both.

The model is ``--preset`` (``tiny``, the CPU preset, by default; ``micro``, ``140m``, ...) with a
``--vocab-size`` of at least the data's 49,152 ids and SmolLM2's special ids (bos 1, eos/pad 2).
``transformers.Trainer`` needs ``accelerate`` (pip install 'accelerate>=1.1.0').

Usage: python benchmarks/train_throughput.py [--preset tiny] [--vocab-size 49152] [--seq-len 256]
       [--micro-batch 8] [--steps 10] [--threads 0] [--device cpu|cuda] [--compile] [--json] [--profile]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` (which torch imports through `inspect`):
# drop this script's folder from the import path first.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

SEED = 1
LR = 1e-3
WARMUP = 2
MIXTURE = {"code": 0.7, "mail": 0.3}
SMOLLM2_SPECIALS = {"bos_id": 1, "eos_ids": [2], "pad_id": 2}


def _rss_mb(peak: bool = True) -> float:
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------------------------------- setup


def build_shards(root: Path) -> Path:
    """Two sources of real text (standard-library modules), tokenized with SmolLM2's tokenizer."""
    from mobilellm_r1.data.shards import TokenizeOptions, tokenize_sources

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    groups = {"code": sorted(stdlib.glob("[a-k]*.py"))[:30], "mail": sorted(stdlib.glob("email/*.py"))[:12]}
    inputs = {}
    for name, files in groups.items():
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files))
        inputs[name] = [str(p)]
    tokenize_sources(inputs, root / "shards", TokenizeOptions(tokenizer="smollm2", workers=1, progress=False))
    return root / "shards"


def write_recipe(root: Path, shards: Path, args) -> Path:
    from mobilellm_r1.config import model_preset

    model = {"preset": args.preset, "vocab_size": args.vocab_size, "attn_impl": args.attn, **SMOLLM2_SPECIALS}
    if args.seq_len > model_preset(args.preset).max_seq_len:
        model["max_seq_len"] = args.seq_len
    stage = {"kind": "pretrain", "steps": args.steps, "seq_len": args.seq_len,
             "micro_batch_size": args.micro_batch, "global_batch_tokens": args.micro_batch * args.seq_len,
             "lr": LR, "min_lr_ratio": 0.0, "warmup_steps": WARMUP, "schedule": "linear", "weight_decay": 0.1,
             "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0, "log_every": 1, "eval_every": 0,
             "eval_batches": 0, "save_every": 0, "keep_checkpoints": 1,
             "doc_mask": args.doc_mask}
    toml = lambda d: "\n".join(f"{k} = {json.dumps(v)}" for k, v in d.items())  # noqa: E731
    text = (f'[run]\nname = "train-throughput"\nseed = {SEED}\n\n[model]\n{toml(model)}\n\n'
            f'[data]\ntokenizer = "smollm2"\nshards_dir = "{shards}"\nheldout_fraction = 0.0\n'
            + "".join(f'[[data.sources]]\nname = "{s}"\n' for s in MIXTURE)
            + f"\n[stages.pre]\n{toml(stage)}\n\n[stages.pre.mixture]\n{toml(MIXTURE)}\n")
    path = root / "recipe.toml"
    path.write_text(text)
    return path


def export_initial_weights(recipe_path: Path, out: Path) -> None:
    """The step-0 weights of ``train_stage`` (``build_student``: seed, then ``Transformer(recipe.model)``)."""
    import torch

    from mobilellm_r1.config import load_recipe
    from mobilellm_r1.model.hf import export_hf
    from mobilellm_r1.model.transformer import Transformer

    recipe = load_recipe(recipe_path)
    torch.manual_seed(recipe.run.seed)
    export_hf(Transformer(recipe.model), out)


# ------------------------------------------------------------------------------------------- profile

# Op-name substrings per family, first match wins; the order matters where names overlap (a fused
# attention kernel mentions "softmax", the optimizer's foreach ops mention "mul"/"add").
FAMILIES = (
    ("optimizer", ("optimizer", "adam", "_foreach", "_fused_adam", "clip_grad")),
    ("attention", ("attention", "flash", "flex", "sdpa", "efficient_attention", "softmax")),
    ("head_loss", ("cross_entropy", "nll_loss", "log_softmax", "logsumexp")),
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "gemm", "cutlass",
              "sm90_", "sm80_", "ampere_", "nvjet")),
    ("norm_rope_swiglu", ("rms_norm", "rsqrt", "silu", "aten::mul", "aten::add", "aten::pow", "aten::mean",
                          "aten::cat", "aten::stack", "aten::neg", "triton_", "elementwise", "vectorized")),
)


def op_families(prof, device: str) -> dict:
    """Self time per op family (ms over the profiled steps) and its share: where a step's time goes.
    Self time, so a parent op (``aten::linear``) is not counted again on top of its ``aten::mm``."""
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    ms = {name: 0.0 for name, _ in FAMILIES} | {"other": 0.0}
    top: dict[str, list] = {k: [] for k in ms}
    for ev in prof.key_averages():
        t = getattr(ev, attr, 0.0) / 1e3
        if t <= 0:
            continue
        low = ev.key.lower()
        fam = next((name for name, keys in FAMILIES if any(k in low for k in keys)), "other")
        ms[fam] += t
        top[fam].append((t, ev.key))
    total = sum(ms.values()) or 1.0
    return {"time": "device self time" if device == "cuda" else "CPU self time", "total_ms": round(total, 2),
            "families": {k: {"ms": round(v, 2), "share": round(v / total, 4),
                             "top_ops": [n for _, n in sorted(top[k], reverse=True)[:5]]} for k, v in ms.items()}}


# ------------------------------------------------------------------------------------------- sides


def run_ours(work: Path, args) -> dict:
    import torch

    import mobilellm_r1.train.loop as loop
    from mobilellm_r1.config import load_recipe

    recipe = load_recipe(work / "recipe.toml")
    import_rss = _rss_mb()
    marks: dict[str, float] = {}
    gather = loop.gather_state

    def gather_state(*a, **kw):  # called only by the final save: the training steps' own peak ends here
        marks.setdefault("train_peak_rss_mb", _rss_mb())
        return gather(*a, **kw)

    loop.gather_state = gather_state
    opts = loop.TrainOptions(out=str(work / "ours_out"), progress=False, device=args.device, compile=args.compile)
    prof = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        prof = profile(activities=acts, record_shapes=True)
        prof.__enter__()
    summary = loop.train_stage(recipe, "pre", opts)
    if prof is not None:
        prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=40), file=sys.stderr)
    steady = summary["tokens_per_s"]
    return {"profile": op_families(prof, args.device) if prof is not None else None,"tokens_per_s": steady, "losses": summary["losses"], "flops_per_token": summary["flops_per_token"],
            "threads": torch.get_num_threads(), "import_rss_mb": import_rss,
            "train_peak_rss_mb": marks.get("train_peak_rss_mb"), "peak_rss_mb": _rss_mb()}


def run_hf(work: Path, args) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import IterableDataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from mobilellm_r1.config import load_recipe
    from mobilellm_r1.data.mixture import MixtureSampler
    from mobilellm_r1.data.shards import ShardSet

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import_rss = _rss_mb()
    recipe = load_recipe(work / "recipe.toml")
    stage = recipe.stage("pre")
    shards = ShardSet(work / "shards")

    class Rows(IterableDataset):
        """The sampler's rows in order (an iterable dataset: the Trainer does not shuffle it). Every pass
        starts a fresh sampler, the one train_stage builds (split "all" without held-out data, rank 0 of 1,
        the run's seed)."""

        def __iter__(self):
            sampler = MixtureSampler(shards, stage.mixture, seq_len=stage.seq_len, seed=recipe.run.seed,
                                     split="all", heldout_fraction=recipe.data.heldout_fraction)
            for _ in range(args.steps * args.micro_batch):
                toks = torch.from_numpy(np.asarray(sampler.next_row()[0], dtype=np.int64))
                inputs = toks[:-1]
                yield {"input_ids": inputs, "labels": inputs, "shift_labels": toks[1:]}

    model = AutoModelForCausalLM.from_pretrained(work / "hf_init", dtype=torch.float32)
    model.train()
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.step_s, self.ends = 0.0, [], []

        def on_step_begin(self, a, state, control, **kw):
            sync()
            self.begin = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            now = time.perf_counter()
            self.step_s.append(now - self.begin)
            self.ends.append(now)

    class RecordingTrainer(Trainer):
        losses: list = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
            self.losses.append((loss[0] if return_outputs else loss).detach())
            return loss

    targs = TrainingArguments(
        output_dir=str(work / "hf_out"), per_device_train_batch_size=args.micro_batch, max_steps=args.steps,
        learning_rate=LR, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.1,
        max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=WARMUP, use_cpu=not cuda, bf16=cuda,
        torch_compile=args.compile, report_to=[],
        save_strategy="no", eval_strategy="no", logging_steps=1, dataloader_num_workers=0,
        dataloader_pin_memory=False, disable_tqdm=True, seed=recipe.run.seed,
        # keep `shift_labels`: the forward's signature does not name it (it travels in **kwargs to the loss)
        remove_unused_columns=False)
    timer = Timer()
    trainer = RecordingTrainer(model=model, args=targs, train_dataset=Rows(), callbacks=[timer])
    model_rss = _rss_mb(peak=False)
    trainer.train()
    step_tokens = args.micro_batch * args.seq_len
    steady = timer.step_s[1:] or timer.step_s
    e2e = np.diff(timer.ends).tolist()  # step k's end minus step k-1's end, k >= 2
    return {"tokens_per_s": float(np.mean([step_tokens / t for t in steady])),
            "tokens_per_s_end_to_end": float(np.mean([step_tokens / t for t in e2e])) if e2e else None,
            "losses": [float(x) for x in trainer.losses], "steps": len(timer.step_s),
            "threads": torch.get_num_threads(), "optim": str(targs.optim.value if hasattr(targs.optim, "value")
                                                            else targs.optim),
            "attn_implementation": model.config._attn_implementation, "import_rss_mb": import_rss,
            "model_rss_mb": model_rss, "train_peak_rss_mb": _rss_mb(), "peak_rss_mb": _rss_mb()}


# ------------------------------------------------------------------------------------------ parent


def _side_cmd(side: str, work: Path, args) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--workdir", str(work),
           "--preset", args.preset, "--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len),
           "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--threads", str(args.threads),
           "--device", args.device] + (["--compile"] if args.compile else [])
    return cmd + (["--profile"] if args.profile and side == "ours" else [])


def run_side(side: str, work: Path, args) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    res = subprocess.run(_side_cmd(side, work, args), capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"--side {side} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    if args.profile and side == "ours":
        print(res.stderr, file=sys.stderr)
    return json.loads((work / f"result_{side}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="model preset (tiny, micro, 140m, ...)")
    ap.add_argument("--vocab-size", type=int, default=49152, help="model vocabulary (>= 49,152, the data's)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: every usable core)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides")
    ap.add_argument("--profile", action="store_true",
                    help="profile our side: op table on stderr, per-family times under 'profile' in the JSON")
    ap.add_argument("--attn", choices=("sdpa", "flex"), default="sdpa",
                    help="attention kernel for document-masked rows (model attn_impl)")
    ap.add_argument("--doc-mask", action="store_true", help="document-masked packed rows (else plain causal)")
    ap.add_argument("--ours-only", action="store_true", help="skip the transformers.Trainer side")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--side", choices=("both", "ours", "hf"), default="both", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is not timed)")
    if args.vocab_size < 49152:
        ap.error("--vocab-size must be >= 49152 (the SmolLM2 token ids of the data)")
    args.threads = args.threads or len(os.sched_getaffinity(0))

    warnings.filterwarnings("ignore")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise SystemExit("transformers.Trainer needs accelerate: pip install 'accelerate>=1.1.0'")
    import torch

    torch.set_num_threads(args.threads)
    if args.side != "both":
        work = Path(args.workdir)
        result = (run_ours if args.side == "ours" else run_hf)(work, args)
        (work / f"result_{args.side}.json").write_text(json.dumps(result))
        return

    from mobilellm_r1.config import load_recipe
    from mobilellm_r1.train.metrics import device_peak, flops_per_token

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as d:
        work = Path(d)
        shards = build_shards(work)
        recipe_path = write_recipe(work, shards, args)
        export_initial_weights(recipe_path, work / "hf_init")
        cfg = load_recipe(recipe_path).model
        ours = run_side("ours", work, args)
        hf = None if args.ours_only else run_side("hf", work, args)
    peak, peak_src = device_peak(torch.device(args.device))
    fpt = flops_per_token(cfg, args.seq_len)
    assert abs(fpt - ours["flops_per_token"]) < 1e-6 * fpt
    mfu = lambda tps: tps * fpt / peak if peak else None  # noqa: E731
    base = {"preset": args.preset, "vocab_size": cfg.vocab_size, "dim": cfg.dim, "n_layers": cfg.n_layers,
            "params": cfg.param_count(), "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "steps": args.steps, "compile": args.compile, "attn": args.attn, "doc_mask": args.doc_mask,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "threads": args.threads,
            "flops_per_token": fpt, "flops_per_token_formula": "6N + attention (train.metrics.flops_per_token)",
            "peak_flops": peak, "peak_source": peak_src, "torch": torch.__version__}
    if hf is None:  # --ours-only: one row of the GPU check
        res = {"ours_tokens_per_s": round(ours["tokens_per_s"], 1), "ours_mfu": mfu(ours["tokens_per_s"]),
               "losses_ours": ours["losses"], "ours_peak_rss_mb": round(ours["peak_rss_mb"], 1),
               "profile": ours["profile"], "config": base}
        print(json.dumps(res) if args.json else
              f"ours {res['ours_tokens_per_s']:,.1f} tokens/s, MFU {res['ours_mfu'] or 0:.1%} ({peak_src})")
        return
    res = {"profile": ours["profile"],
        "ours_tokens_per_s": round(ours["tokens_per_s"], 1), "hf_tokens_per_s": round(hf["tokens_per_s"], 1),
        "ratio": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
        "ours_mfu": mfu(ours["tokens_per_s"]), "hf_mfu": mfu(hf["tokens_per_s"]),
        "ours_peak_rss_mb": round(ours["peak_rss_mb"], 1), "hf_peak_rss_mb": round(hf["peak_rss_mb"], 1),
        "first_loss_ours": ours["losses"][0], "first_loss_hf": hf["losses"][0],
        "hf_tokens_per_s_end_to_end": round(hf["tokens_per_s_end_to_end"], 1)
        if hf["tokens_per_s_end_to_end"] else None,
        "ours_train_peak_rss_mb": round(ours["train_peak_rss_mb"], 1) if ours["train_peak_rss_mb"] else None,
        "ours_import_rss_mb": round(ours["import_rss_mb"], 1), "hf_import_rss_mb": round(hf["import_rss_mb"], 1),
        "losses_ours": ours["losses"], "losses_hf": hf["losses"],
        "config": {**base, "step_tokens": args.micro_batch * args.seq_len,
                   "load_avg_1m_before": round(load_before[0], 2),
                   "load_avg_1m_after": round(os.getloadavg()[0], 2),
                   "hf_optim": hf["optim"], "hf_attn_implementation": hf["attn_implementation"],
                   "transformers": __import__("transformers").__version__},
    }
    if args.json:
        print(json.dumps(res))
        return
    c = res["config"]
    print(f"{args.preset} ({c['params'] / 1e6:.1f}M params, vocab {c['vocab_size']}): {args.steps} steps of "
          f"{args.micro_batch} x {args.seq_len} tokens, "
          + (f"bf16 autocast on {c['device']}" if args.device == "cuda" else f"fp32 CPU, {args.threads} threads")
          + f"; peak {(peak or 0) / 1e9:.1f} GFLOP/s ({peak_src})")
    print(f"{'':14}{'tokens/s':>10}{'MFU':>8}{'peak RSS':>11}{'first loss':>12}")
    print(f"{'ours':14}{res['ours_tokens_per_s']:>10,.1f}{res['ours_mfu'] or 0:>8.1%}"
          f"{res['ours_peak_rss_mb']:>8,.0f} MB{res['first_loss_ours']:>12.5f}")
    print(f"{'transformers':14}{res['hf_tokens_per_s']:>10,.1f}{res['hf_mfu'] or 0:>8.1%}"
          f"{res['hf_peak_rss_mb']:>8,.0f} MB{res['first_loss_hf']:>12.5f}")
    print(f"ratio (ours/HF) {res['ratio']:.3f}   |first-loss difference| "
          f"{abs(res['first_loss_ours'] - res['first_loss_hf']):.2e}")
    print(f"HF end to end (batch fetch and logging included, as ours): {res['hf_tokens_per_s_end_to_end']:,.1f} "
          f"tokens/s; ours' peak RSS before its final checkpoint: {res['ours_train_peak_rss_mb']:,.0f} MB")
    print(f"1-minute load average: {c['load_avg_1m_before']} before, {c['load_avg_1m_after']} after "
          "(other work on the machine slows both sides unevenly: compare runs taken at low load)")


if __name__ == "__main__":
    main()
