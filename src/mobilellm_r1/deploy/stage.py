"""The deploy stage of a run: quantize, export and benchmark one checkpoint (``[deploy]`` of a recipe)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import DeployConfig


def perplexity_ratio(ckpt_dir: str | Path, quant_dir: str | Path, shards: str | Path, seq_len: int = 256,
                     max_tokens: int = 4096, heldout_fraction: float = 0.0) -> dict[str, Any]:
    """Accuracy impact of the quantization: held-out perplexity of the fake-quant model over the fp32
    model's, on the same windows of a shard directory (``mobilellm-r1 probe``'s NLL)."""
    from ..eval.probe import token_nll
    from ..model.gguf import load_any

    out = {}
    for name, spec in (("fp32", ckpt_dir), ("8da4w", quant_dir)):
        model, _ = load_any(spec)
        r = token_nll(model, shards, seq_len=seq_len, max_tokens=max_tokens, heldout_fraction=heldout_fraction,
                      bits_per_byte=False)
        out[name] = r["overall"]
    out["ppl_ratio"] = out["8da4w"]["ppl"] / out["fp32"]["ppl"]
    out["seq_len"], out["max_tokens"] = seq_len, max_tokens
    return out


def run_deploy(ckpt_dir: str | Path, out_dir: str | Path, cfg: DeployConfig, shards: str | Path | None = None,
               heldout_fraction: float = 0.0, log=print) -> dict[str, Any]:
    """Quantize ``ckpt_dir`` into ``OUT/quantized``, export ``OUT/model-8da4w.pte`` (static cache of the
    largest context), optionally measure the perplexity ratio on ``shards``, and benchmark the runtimes
    of ``cfg``. Writes ``OUT/deploy.json`` and ``OUT/deploy.md``; returns the JSON."""
    from ..model.io import load_model, resolve_tokenizer_spec
    from .bench import bench
    from .export import export_executorch
    from .quantize import quantize_model, save_quantized

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"checkpoint": str(ckpt_dir)}
    t = time.perf_counter()
    model, meta = load_model(ckpt_dir)
    res["quantization"] = quantize_model(model, cfg.group_size, cfg.embedding_group_size, cfg.embedding_bits)
    save_quantized(out / "quantized", model, res["quantization"],
                   resolve_tokenizer_spec(ckpt_dir, meta.get("tokenizer") or ""))
    res["quantize_s"] = time.perf_counter() - t
    log(f"quantized in {res['quantize_s']:.1f}s -> {out / 'quantized'}")
    if shards is not None:
        res["accuracy"] = perplexity_ratio(ckpt_dir, out / "quantized", shards,
                                           heldout_fraction=heldout_fraction)
        log(f"perplexity ratio 8da4w/fp32: {res['accuracy']['ppl_ratio']:.4f}")
    t = time.perf_counter()
    pte = out / "model-8da4w.pte"
    res["export"] = export_executorch(model, pte, cfg.max_context or max(cfg.contexts), quantized=True,
                                      source=str(ckpt_dir))
    res["export_s"] = time.perf_counter() - t
    log(f"exported in {res['export_s']:.1f}s -> {pte} ({res['export']['bytes'] / 1e6:.1f} MB, "
        f"{res['export']['size_ratio']:.1%} of fp32)")
    t = time.perf_counter()
    res["bench"] = bench(ckpt_dir, pte, cfg)
    res["bench_s"] = time.perf_counter() - t
    (out / "deploy.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "deploy.md").write_text(res["bench"]["table"])
    return res
