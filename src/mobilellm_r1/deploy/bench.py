"""Decode throughput and memory across context lengths (paper section 8, Table 10), against the
memory-bandwidth roofline.

Rows (runtimes): ``eager_fp32`` (``Transformer.forward`` with our KV cache, weights as trained),
``generator_fp32`` (:func:`mobilellm_r1.model.generate.generate` after ``decode_layout()``, what
``mobilellm-r1 generate`` runs), ``executorch_8da4w`` (the exported XNNPACK ``.pte``) and ``llamacpp_q4_0``
(llama.cpp on our GGUF export, 4-bit groups of 32, through the prebuilt ``cyllama`` bindings of the
``deploy`` extra, whose kernels are AVX2; absent bindings make the row a "skipped" line) and, on request,
``llamacpp_native``: the same GGUF timed by the ``llama-bench`` of a llama.cpp built for this CPU
(``DeployConfig.llama_bench``; prompt processing of the prompt, then generation at that depth; its memory is
not measured). Columns: contexts
(prompt + generation tokens). At context ``C`` a run fills ``C - new_tokens`` positions (a real prefill of
random token ids, or with ``fill = "synthetic"`` a zero cache: decode cost does not depend on the cached
values) and times ``new_tokens`` greedy decode steps, ``rounds`` times over the same positions, reporting
the median round. Time to first token (``ttft_s``) is the prefill of the ``C - new_tokens`` prompt plus the
choice of the first token: in one forward for the torch runtimes, in chunks of the file's prefill length
for the ``.pte``, in llama.cpp's batches of ``LLAMACPP_BATCH`` (its default) for llama.cpp. llama.cpp has no
synthetic fill: it always prefills.

Runtimes run in worker processes (``python -m mobilellm_r1.deploy.bench --worker``), one for the two
torch runtimes, one for ExecuTorch and one for llama.cpp's bindings (their thread pools interfere in one
process), each importing its libraries once for all its contexts; ``llama-bench`` is a process of its own.
Memory is what a run needs: a runtime is loaded after the imports (RSS then is its ``baseline_rss_mb``),
and each (runtime, context) cell reports the peak RSS of the load or of its own context run (``VmHWM``,
reset per cell) over that baseline as ``mem_mb``, the absolute peak as ``peak_rss_mb``. A context whose predicted memory exceeds the limit, or that fails to allocate, is
reported ``"OOM"``.

Roofline: decoding one token reads every weight once (the head included; of the embedding only one row)
plus the KV cache of the whole context, so ``tokens/s <= bandwidth / bytes_per_token``, with the
bandwidth measured in the same worker at the same thread count (a streaming ``torch.sum``), just before
and just after each cell (the better of the two): on a shared machine the load of neighbours drifts, and a
bandwidth measured minutes away from the decode made the fraction swing from 0.28 to 0.54 between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from .config import DeployConfig

OOM = "OOM"
LLAMACPP = "llamacpp_q4_0"
LLAMACPP_BATCH = 512  # llama.cpp's default n_batch: the prompt goes through in batches of this many tokens
LLAMACPP_MISSING = "skipped: no llama.cpp bindings (pip install 'mobilellm-r1[deploy]' brings cyllama)"
LLAMACPP_NATIVE = "llamacpp_native"


# ------------------------------------------------------------------------------------ byte accounting


def kv_bytes_per_position(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    """Bytes of keys + values one context position holds (every layer application)."""
    apps = cfg.n_layers * (2 if cfg.weight_sharing else 1)
    return apps * 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def weight_bytes_per_token(cfg: ModelConfig, quantized: bool, group_size: int = 0) -> int:
    """Weight bytes one decode step reads: every linear and the head once, norms, one embedding row.
    ``quantized``: as the XNNPACK ``.pte`` stores 8da4w: int4 weights (half a byte) plus one bf16 scale per
    group (XNNPACK converts per-group scales to bf16); the 4-bit embedding row has fp32 scales per 32."""
    from .quantize import resolve_group_size

    d, hd = cfg.dim, cfg.head_dim
    shapes = [(d, cfg.n_heads * hd), (d, cfg.n_kv_heads * hd), (d, cfg.n_kv_heads * hd), (cfg.n_heads * hd, d),
              (d, cfg.ffn_dim), (d, cfg.ffn_dim), (cfg.ffn_dim, d)]
    linears = shapes * cfg.n_layers + [(d, cfg.vocab_size)]
    norms = 4 * d * (2 * cfg.n_layers + 1)
    if not quantized:
        return 4 * sum(i * o for i, o in linears) + norms + 4 * d
    gs = resolve_group_size(cfg, group_size)
    return sum(i * o // 2 + 2 * (i // gs) * o for i, o in linears) + norms + d // 2 + 4 * (d // 32)


def bytes_per_token(cfg: ModelConfig, context: int, quantized: bool, group_size: int = 0) -> int:
    return weight_bytes_per_token(cfg, quantized, group_size) + context * kv_bytes_per_position(cfg)


def available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


def q4_0_bytes_per_token(cfg: ModelConfig) -> int:
    """Weight bytes one llama.cpp decode step reads from a q4_0 GGUF: every matrix (the tied head too) in
    blocks of 32 weights stored in 18 bytes (16 of nibbles, an f16 scale), f32 norms, one embedding row."""
    d, hd = cfg.dim, cfg.head_dim
    per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.ffn_dim
    return (per_layer * cfg.n_layers + d * cfg.vocab_size) * 18 // 32 + 4 * d * (2 * cfg.n_layers + 1) + d * 18 // 32


def predicted_peak_bytes(cfg: ModelConfig, context: int, runtime: str) -> int:
    """A coarse upper estimate of a run's memory: weights (fp32 copies for eager), the KV cache, and the
    prefill activations (attention works blockwise; MLP and head activations of the prefill length; the
    exported program prefills in chunks of its get_max_seq_len)."""
    fp32_w = 4 * cfg.param_count()
    kv = context * kv_bytes_per_position(cfg)
    if runtime == LLAMACPP:  # q4_0 weights, f16 KV cache, batches of LLAMACPP_BATCH rows
        acts = 4 * min(context, LLAMACPP_BATCH) * (3 * cfg.ffn_dim + 6 * cfg.dim + cfg.vocab_size)
        return fp32_w // 7 + kv // 2 + acts + (512 << 20)
    rows = context if runtime != "executorch_8da4w" else 1
    acts = 4 * rows * (3 * cfg.ffn_dim + 6 * cfg.dim)
    return (fp32_w if runtime != "executorch_8da4w" else fp32_w // 3) + kv + acts + (512 << 20)


# ------------------------------------------------------------------------------------------- worker


_BW_BUFFERS: dict[int, Any] = {}


def measure_bandwidth(threads: int, mb: int = 256, repeats: int = 5) -> float:
    """Streaming read bandwidth (bytes/s): best of ``repeats`` ``torch.sum`` over a buffer larger than the
    caches (the fastest read of the ops tried here: ``sum`` 15.3 GB/s on one thread, ``amax`` 14.0, a numpy
    sum 11.3, a dot product 11.5)."""
    import torch

    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    # one buffer per process, kept: the worker allocates it before a runtime's memory baseline, so the
    # measurements around each cell do not show up in that cell's peak memory
    x = _BW_BUFFERS.get(mb)
    if x is None:
        x = _BW_BUFFERS[mb] = torch.ones(mb * (1 << 20) // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(own)
    return x.numel() * 4 / best


def _decode_summary(times: list[float], steps: int, prefill_s: float) -> dict[str, Any]:
    """Rounds of ``steps`` decode steps taking ``times`` seconds each -> the median round's tokens/s."""
    rates = sorted(steps / t for t in times)
    return {"decode_tok_s": rates[len(rates) // 2], "decode_tok_s_rounds": rates, "prefill_s": prefill_s}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window: ``VmHWM`` drops to the current RSS (Linux >= 4.0). ``ru_maxrss`` is
    no use here: it survives ``exec``, so a worker started by a large process inherits its parent's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> tuple[float, float]:
    """``(current, peak since the last reset)`` resident memory of this process, in MB."""
    return _status_kb("VmRSS") / 1024, _status_kb("VmHWM") / 1024


def _torch_runner(spec: dict[str, Any]):
    import torch

    from ..model.generate import generate
    from ..model.gguf import load_any

    model, _ = load_any(spec["model"], dtype=torch.float32)
    model.eval()
    fast = spec["runtime"] == "generator_fp32"
    if fast:
        model.decode_layout()

    @torch.inference_mode()
    def run(context: int, new: int, fill: str, prompt: list[int], rounds: int) -> dict[str, Any]:
        if context > model.cfg.max_seq_len:
            model.set_rope(max_seq_len=context)
            if fast:
                model.decode_layout()
        if fast and fill == "prefill":
            res = [generate(model, [prompt], new, stop_token_ids=[]) for _ in range(rounds)]
            return {**_decode_summary([(new - 1) / r.decode_tokens_per_s for r in res], new - 1, res[0].prefill_s),
                    "ttft_s": res[0].prefill_s}
        cache = model.new_cache(1, context)
        t0 = time.perf_counter()
        if fill == "prefill":
            logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[:, -1]
        else:
            cache.length = context - new
            logits = model(torch.tensor([[prompt[-1]]]), cache=cache)[:, -1]
        prefill_s = time.perf_counter() - t0
        pos, first, times = cache.length, logits.argmax(-1), []
        for _ in range(rounds):  # each round re-decodes the same positions
            cache.length = pos
            nxt = first
            t1 = time.perf_counter()
            for _ in range(new - 1):
                nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
                nxt.item()
            times.append(time.perf_counter() - t1)
        return {**_decode_summary(times, new - 1, prefill_s), "ttft_s": prefill_s if fill == "prefill" else None}

    return run, model.cfg


def _pte_runner(spec: dict[str, Any]):
    from ..config import build
    from .export import PteRunner

    r = PteRunner(spec["model"], threads=spec["threads"])

    def run(context: int, new: int, fill: str, prompt: list[int], rounds: int) -> dict[str, Any]:
        if context > r.max_context:
            raise ValueError(f"context {context} exceeds the exported context {r.max_context}")
        t0 = time.perf_counter()
        if fill == "prefill":
            logits = r.prefill(prompt)
            pos = len(prompt)
        else:
            pos = context - new
            logits = r.step(prompt[-1], pos - 1)
        prefill_s = time.perf_counter() - t0
        first, times = int(logits.argmax()), []
        # time to first token: the prompt through the model (in chunks of the file's get_max_seq_len) and
        # the first token chosen from its last logits; only meaningful for a real prefill
        ttft_s = time.perf_counter() - t0 if fill == "prefill" else None
        for _ in range(rounds):  # the static cache is overwritten at the same positions each round
            t = first
            t1 = time.perf_counter()
            for i in range(new - 1):
                t = int(r.step(t, pos + i).argmax())
            times.append(time.perf_counter() - t1)
        return {**_decode_summary(times, new - 1, prefill_s), "ttft_s": ttft_s, "prefill_chunk": r.prefill_chunk}

    return run, build(ModelConfig, r.meta["model"], f"{spec['model']}.json:model")


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("cyllama") is not None


def wants_gguf(runtimes: list[str]) -> bool:
    """Whether a benchmark of ``runtimes`` needs a GGUF export: the native llama.cpp row always (its binary
    is outside Python), the bindings' row when the bindings are installed (else it is a "skipped" line)."""
    return LLAMACPP_NATIVE in runtimes or (LLAMACPP in runtimes and llamacpp_available())


def gguf_config(path: str | Path) -> ModelConfig:
    """The model configuration a GGUF's metadata describes (no tensor is read). Slow for a large vocabulary:
    gguf's reader parses every token and merge string (~20 s at Llama-3's 128k ids), so the benchmark passes
    the configuration it already has to its workers instead."""
    from gguf import GGUFReader

    from ..model.gguf import _fields, config_from_gguf

    reader = GGUFReader(path)
    return config_from_gguf(_fields(reader), {t.name for t in reader.tensors}, str(path))


def _llamacpp_runner(spec: dict[str, Any]):
    """llama.cpp on a GGUF through cyllama's bindings of its C API: one context of the largest context
    length, prompts in batches of ``LLAMACPP_BATCH``, greedy sampling by llama.cpp's own sampler (the argmax
    over the vocabulary, as the other runtimes take it)."""
    from cyllama.llama import llama_cpp as cy

    cfg = ModelConfig(**spec["model_config"]) if spec.get("model_config") else gguf_config(spec["model"])
    cy.disable_logging()
    cy.ggml_backend_load_all()
    mp = cy.LlamaModelParams()
    mp.n_gpu_layers = 0
    model = cy.LlamaModel(spec["model"], mp)
    cp = cy.LlamaContextParams()
    cp.n_ctx = max(spec["contexts"])
    cp.n_batch = cp.n_ubatch = LLAMACPP_BATCH
    cp.n_threads = cp.n_threads_batch = spec["threads"]
    ctx = cy.LlamaContext(model, cp)
    sampler = cy.LlamaSampler(cy.LlamaSamplerChainParams())
    sampler.add_greedy()

    def run(context: int, new: int, fill: str, prompt: list[int], rounds: int) -> dict[str, Any]:
        ctx.memory_seq_rm(0, 0, -1)
        t0 = time.perf_counter()
        for i in range(0, len(prompt), LLAMACPP_BATCH):
            ctx.decode(cy.llama_batch_get_one(prompt[i:i + LLAMACPP_BATCH], i))
        first = sampler.sample(ctx, -1)
        ttft_s = time.perf_counter() - t0
        pos, times = len(prompt), []
        for _ in range(rounds):  # each round drops what the previous one cached and re-decodes the same positions
            ctx.memory_seq_rm(0, pos, -1)
            t = first
            t1 = time.perf_counter()
            for i in range(new - 1):
                ctx.decode(cy.llama_batch_get_one([t], pos + i))
                t = sampler.sample(ctx, -1)
            times.append(time.perf_counter() - t1)
        return {**_decode_summary(times, new - 1, ttft_s), "ttft_s": ttft_s, "prefill_chunk": LLAMACPP_BATCH}

    return run, cfg


def llama_bench_row(binary: str, gguf: str | Path, context: int, new: int, threads: int, rounds: int,
                    timeout: float = 1800) -> dict[str, Any]:
    """One ``llamacpp_native`` cell: llama-bench's prompt processing of ``context - new`` tokens (in batches
    of ``LLAMACPP_BATCH``) and its generation of ``new`` tokens after that many, ``rounds`` repetitions each
    (llama-bench reports their mean). Time to first token = the prompt at the measured rate plus one token."""
    prompt = context - new

    def run(*args: str) -> float:
        proc = subprocess.run([binary, "-m", str(gguf), "-t", str(threads), "-b", str(LLAMACPP_BATCH), "-ub",
                               str(LLAMACPP_BATCH), "-r", str(rounds), "-o", "json", *args],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-bench failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}")
        return float(json.loads(proc.stdout)[0]["avg_ts"])

    pp = run("-p", str(prompt), "-n", "0")
    tg = run("-p", "0", "-n", str(new), "-d", str(prompt))
    return {"context": context, "status": "ok", "decode_tok_s": tg, "decode_tok_s_rounds": [tg],
            "prefill_s": prompt / pp, "ttft_s": prompt / pp + 1 / tg, "prefill_tok_s": pp,
            "prefill_chunk": LLAMACPP_BATCH, "mem_mb": None}


def _trim() -> None:
    """Hand freed heap memory back to the OS, so a new peak window starts from what is really in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _run_context(run, cfg: ModelConfig, spec: dict[str, Any], runtime: str, c: int, g) -> dict[str, Any]:
    import torch

    row: dict[str, Any] = {"runtime": runtime, "context": c}
    if predicted_peak_bytes(cfg, c, runtime) > spec["memory_limit"]:
        row["status"] = OOM
        return row
    prompt = torch.randint(0, cfg.vocab_size, (c - spec["new_tokens"],), generator=g).tolist()
    try:
        before = measure_bandwidth(spec["threads"], repeats=3)
        row.update(run(c, spec["new_tokens"], spec["fill"], prompt, spec["rounds"]))
        # the physical limit around this cell: the better of the measurements just before and after it
        row["bandwidth"] = max(before, measure_bandwidth(spec["threads"], repeats=3))
        row["status"] = "ok"
    except (MemoryError, torch.OutOfMemoryError):
        row["status"] = OOM
    except (RuntimeError, ValueError) as e:
        row["status"] = OOM if "alloc" in str(e).lower() or "memory" in str(e).lower() else f"error: {e}"
    return row


def worker(spec: dict[str, Any]) -> None:
    """Run runtimes of one kind (torch or ExecuTorch) over their contexts, printing one JSON line per
    (runtime, context) cell, and one for the bandwidth.

    Memory (Table 10's row): each runtime is loaded after its libraries are imported and the previous
    runtime is freed; the baseline is the RSS just before its load, and a cell's ``mem_mb`` is the peak
    RSS of its load or of its own context run (``VmHWM``, reset before each) over that baseline: what the
    model run needs, not the interpreter and libraries (``baseline_rss_mb``), nor a parent's peak."""
    import torch

    kind = spec["runtimes"][0]["runtime"]
    pte, own_pool = kind == "executorch_8da4w", kind in ("executorch_8da4w", LLAMACPP)
    # ExecuTorch's (and llama.cpp's) own thread pool does the work in its worker; torch only takes an argmax
    # there, and torch's OpenMP threads spinning after it took the cores from XNNPACK (2 threads: 5.6 -> 3.9 ms
    # for the head)
    torch.set_num_threads(1 if own_pool else spec["threads"])
    if pte:
        from .export import load_runtime

        load_runtime()
    elif kind == LLAMACPP:
        from cyllama.llama import llama_cpp  # noqa: F401  (imports before the baseline)
    else:
        from ..model.generate import generate  # noqa: F401  (imports before the baseline)
        from ..model.gguf import load_any  # noqa: F401
    print(json.dumps({"bandwidth": measure_bandwidth(spec["threads"])}), flush=True)
    for item in spec["runtimes"]:
        rt = item["runtime"]
        _trim()
        base, _ = rss_mb()
        resettable = reset_peak_rss()
        runner = _pte_runner if pte else _llamacpp_runner if kind == LLAMACPP else _torch_runner
        run, cfg = runner({**spec, **item})
        load_peak = rss_mb()[1]
        g = torch.Generator().manual_seed(0)
        for c in sorted(item["contexts"]):
            _trim()
            reset_peak_rss()
            row = _run_context(run, cfg, spec, rt, c, g)
            peak = max(rss_mb()[1], load_peak)
            row.update(baseline_rss_mb=base, peak_rss_mb=peak, mem_mb=peak - base, peak_reset=resettable)
            print(json.dumps(row), flush=True)
        del run


# ------------------------------------------------------------------------------------------- driver


def _worker_groups(runtimes: list[str]) -> list[list[str]]:
    """The torch runtimes share one worker (one import of torch and our model code); ExecuTorch and llama.cpp
    get their own: their thread pools and torch's interfere when timing."""
    own = ("executorch_8da4w", LLAMACPP, LLAMACPP_NATIVE)
    groups = [[r for r in runtimes if r not in own]] + [[r for r in runtimes if r == o] for o in own]
    return [g for g in groups if g]


def run_worker(items: list[dict[str, Any]], cfg: DeployConfig, mcfg: ModelConfig, max_context: int = 0,
               timeout: float = 3600) -> dict:
    """One worker process for ``items`` (``{"runtime", "model"}`` of one kind) over the contexts that can
    run; contexts predicted above the memory limit are "OOM" and contexts beyond an export's static cache
    are errors, without a process. Returns ``{"bandwidth", "rows": {runtime: {context: row}}}``."""
    limit = int(cfg.memory_limit_gb * (1 << 30)) or available_memory_bytes()
    rows: dict[str, dict[int, dict[str, Any]]] = {it["runtime"]: {} for it in items}
    todo_items = []
    for it in items:
        rt, r = it["runtime"], rows[it["runtime"]]
        for c in cfg.contexts:
            if rt == "executorch_8da4w" and max_context and c > max_context:
                r[c] = {"context": c, "status": f"error: context {c} exceeds the exported context {max_context}"}
            elif predicted_peak_bytes(mcfg, c, rt) > limit:
                r[c] = {"context": c, "status": OOM}
        todo = [c for c in cfg.contexts if c not in r]
        if todo:
            todo_items.append({**it, "contexts": todo})
    if not todo_items:
        return {"bandwidth": None, "rows": rows}
    spec = {"runtimes": todo_items, "threads": cfg.threads, "new_tokens": cfg.new_tokens, "fill": cfg.fill,
            "rounds": cfg.rounds, "memory_limit": limit, "model_config": asdict(mcfg)}
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "mobilellm_r1.deploy.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    bw = None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            if "runtime" in d:
                rows[d.pop("runtime")][d["context"]] = d
            else:
                bw = d["bandwidth"]
    for it in todo_items:  # killed (e.g. by the kernel's OOM killer) before reaching these
        for c in it["contexts"]:
            rows[it["runtime"]].setdefault(c, {"context": c, "status": OOM if proc.returncode in (-9, 137) else
                                               f"worker failed (rc {proc.returncode}): "
                                               f"{proc.stderr.strip().splitlines()[-1:]}"})
    return {"bandwidth": bw, "rows": rows}


def bench(model_dir: str | Path | None, pte: str | Path | None, cfg: DeployConfig,
          contexts: list[int] | None = None, gguf: str | Path | None = None) -> dict[str, Any]:
    """Benchmark the runtimes of ``cfg.runtimes`` that have an input: fp32 ones need ``model_dir`` (our
    checkpoint), ``executorch_8da4w`` needs ``pte``, ``llamacpp_q4_0`` a q4_0 ``gguf`` export (and the
    cyllama bindings: without them its row is one "skipped" line). Returns the results (see :func:`table`)."""
    from ..model.gguf import load_any

    contexts = sorted(contexts or cfg.contexts)
    if any(c <= cfg.new_tokens for c in contexts):
        raise ValueError(f"every context must exceed new_tokens ({cfg.new_tokens}): {contexts}")
    mcfg = None
    if model_dir is not None:
        mcfg = load_any(model_dir)[1]["config"]
    q_group, max_context = 0, 0
    if pte is not None:
        from .export import sidecar

        meta = json.loads(sidecar(pte).read_text())
        from ..config import build

        mcfg = mcfg or build(ModelConfig, meta["model"], str(sidecar(pte)))
        q_group = (meta.get("quantization") or {}).get("group_size", 0)
        max_context = int(meta.get("max_context", 0))
    if mcfg is None and gguf is not None:
        mcfg = gguf_config(gguf)
    results: dict[str, Any] = {"contexts": contexts, "threads": cfg.threads, "new_tokens": cfg.new_tokens,
                               "fill": cfg.fill, "runtimes": {}, "config": asdict(cfg)}
    bws = []
    cfg = replace(cfg, contexts=contexts)
    inputs = {"executorch_8da4w": pte, LLAMACPP: gguf, LLAMACPP_NATIVE: gguf}
    for group in _worker_groups(list(cfg.runtimes)):
        items = [{"runtime": rt, "model": str(inputs.get(rt, model_dir))} for rt in group
                 if inputs.get(rt, model_dir) is not None]
        if not items:
            continue
        if group == [LLAMACPP] and not llamacpp_available():
            results["runtimes"][LLAMACPP] = {"bandwidth": None, "rows": [{"context": c, "status": LLAMACPP_MISSING}
                                                                         for c in contexts]}
            continue
        if group == [LLAMACPP_NATIVE]:
            r = _native_rows(cfg, gguf, contexts)
        else:
            r = run_worker(items, cfg, mcfg, max_context)
        if r["bandwidth"]:
            bws.append(r["bandwidth"])
        for it in items:
            rt = it["runtime"]
            quant = rt == "executorch_8da4w"
            gg = rt in (LLAMACPP, LLAMACPP_NATIVE)
            wb = q4_0_bytes_per_token(mcfg) if gg else weight_bytes_per_token(mcfg, quant, q_group)
            for c, row in r["rows"][rt].items():
                row["weight_bytes_per_token"] = wb
                row["kv_bytes_per_token"] = c * kv_bytes_per_position(mcfg, 2 if gg else 4)
                row["bytes_per_token"] = wb + row["kv_bytes_per_token"]
                if row.get("status") == "ok":  # an ok row always carries the bandwidth measured around it
                    roof = row["bandwidth"] / row["bytes_per_token"]
                    row["roofline_tok_s"] = roof
                    row["roofline_fraction"] = row["decode_tok_s"] / roof
            results["runtimes"][rt] = {"bandwidth": r["bandwidth"], "rows": [r["rows"][rt][c] for c in contexts]}
    results["bandwidth"] = max(bws) if bws else None
    results["kv_bytes_per_position"] = kv_bytes_per_position(mcfg)
    results["table"] = table(results)
    return results


def _native_rows(cfg: DeployConfig, gguf: str | Path, contexts: list[int]) -> dict[str, Any]:
    """``llamacpp_native`` cells, in this process (llama-bench is a process of its own), with the bandwidth
    measured around each as for the other runtimes."""
    binary = cfg.llama_bench
    rows: dict[int, dict[str, Any]] = {}
    for c in contexts:
        if not binary or not Path(binary).is_file():
            rows[c] = {"context": c, "status": "skipped: no llama-bench binary (deploy.llama_bench / --llama-bench)"}
            continue
        before = measure_bandwidth(cfg.threads, repeats=3)
        try:
            rows[c] = llama_bench_row(binary, gguf, c, cfg.new_tokens, cfg.threads, cfg.rounds)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as e:
            rows[c] = {"context": c, "status": f"error: {e}"}
            continue
        rows[c]["bandwidth"] = max(before, measure_bandwidth(cfg.threads, repeats=3))
    return {"bandwidth": None, "rows": {LLAMACPP_NATIVE: rows}}


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if row.get("status") != "ok":
        return str(row.get("status", "-"))[:40]
    v = row.get(key)
    return "-" if v is None else format(v, fmt)


def _ctx(c: int) -> str:
    return f"{c // 1024}k" if c % 1024 == 0 else str(c)


GRIDS = (("decode tokens/s", "decode_tok_s", ".1f"),
         ("time to first token (s): prefill of the context's prompt and the first token", "ttft_s", ".2f"),
         ("fraction of bandwidth roofline", "roofline_fraction", ".2f"),
         ("memory (MB): peak RSS of load and decode over the post-import baseline", "mem_mb", ".0f"))


def grids(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The paper's Table 10 as ``(title, header, rows)`` grids: decode tokens/s per runtime (rows) and context
    (columns), then the same grid as a fraction of the bandwidth roofline and as peak memory."""
    header = ["runtime", *(_ctx(c) for c in results["contexts"])]
    note = f" ({results['threads']} thread(s), {results['new_tokens']} new tokens)"
    return [(title + note, header, [[rt, *(_cell(row, key, fmt) for row in r["rows"])]
                                    for rt, r in results["runtimes"].items()])
            for title, key, fmt in GRIDS]


def table(results: dict[str, Any]) -> str:
    """:func:`grids` as Markdown."""
    parts = []
    for title, header, rows in grids(results):
        lines = [f"**{title}**\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    worker(json.loads(ap.parse_args().worker))


if __name__ == "__main__":
    _main()
