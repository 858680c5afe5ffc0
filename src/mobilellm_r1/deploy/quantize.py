"""The paper's deployment quantization (section 8), through torchao's configs.

- Every linear layer, the output head included: 8-bit dynamic per-token activations, 4-bit symmetric
  weights in groups along the input dimension (torchao ``Int8DynamicActivationIntxWeightConfig``, "8da4w").
  Group size: 32 when the hidden size is not a multiple of 128, else 128 (:func:`auto_group_size`).
- The token embedding: 4-bit symmetric weight-only, group 32 (``IntxWeightOnlyConfig`` on ``nn.Embedding``).

With tied embeddings the head and the embedding hold one matrix, but the two schemes differ (the head's
activations are quantized, the embedding is a table lookup), so :func:`untie_head` gives the head its own
copy before quantizing; each copy is then stored once, in its own format.

A group size that does not divide a layer's input size is an error naming the layer
(:class:`GroupSizeError`); no layer is ever skipped silently.

Run eagerly, the quantized :class:`~mobilellm_r1.model.transformer.Transformer` computes what the
on-device runtime computes (quantize activations per token, dequantize the int4 groups, matmul), so it is
the fake-quant model for accuracy: ``mobilellm-r1 probe``/``eval`` load a directory written by
:func:`save_quantized` like any checkpoint. It is *slower* than fp32 on x86 (no fast int4 kernels in the
torchao wheel); the speed comes from the ExecuTorch export (:mod:`.export`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ModelConfig, to_dict
from ..model.io import CONFIG, FORMAT, CheckpointError, atomic_dir, read_meta, write_json
from ..model.transformer import Transformer

QUANT_WEIGHTS = "model.quant.pt"  # torchao tensor-subclass state dict (torch.save, weights_only loadable)


class GroupSizeError(ValueError):
    """A group size that does not divide a layer's input size (the message names the layer)."""


def quiet_torchao() -> None:
    """torchao logs failed loads of its CUDA-only extensions on a CPU machine: keep them off stderr."""
    logging.getLogger("torchao").setLevel(logging.CRITICAL)


def auto_group_size(cfg: ModelConfig) -> int:
    """Paper section 8: group 32 when the hidden size is not divisible by 128, else 128."""
    return 32 if cfg.dim % 128 else 128


def resolve_group_size(cfg: ModelConfig, group_size: int = 0) -> int:
    return group_size or auto_group_size(cfg)


def untie_head(model: Transformer) -> Transformer:
    """Give a tied model an ``lm_head`` holding a copy of the embedding (same values, same logits)."""
    if model.lm_head is None:
        w = model.embed_tokens.weight
        head = nn.Linear(model.cfg.dim, model.cfg.vocab_size, bias=False, device=w.device, dtype=w.dtype)
        head.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        model.lm_head = head
    return model


def check_group_sizes(model: nn.Module, group_size: int, embedding_group_size: int) -> None:
    """Raise :class:`GroupSizeError` naming the first linear (embedding) whose input size (width) the group
    size does not divide."""
    if group_size <= 0 or embedding_group_size <= 0:
        raise GroupSizeError(f"group sizes must be positive, got {group_size} / {embedding_group_size}")
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.in_features % group_size:
            raise GroupSizeError(f"layer {name}: input size {m.in_features} is not divisible by group size "
                                 f"{group_size} (choose a divisor of {m.in_features})")
        if isinstance(m, nn.Embedding) and m.embedding_dim % embedding_group_size:
            raise GroupSizeError(f"layer {name}: embedding width {m.embedding_dim} is not divisible by "
                                 f"embedding group size {embedding_group_size}")


@torch.no_grad()
def quantize_model(model: Transformer, group_size: int = 0, embedding_group_size: int = 32,
                   embedding_bits: int = 4, scheme: str = "8da4w") -> dict[str, Any]:
    """Quantize ``model`` in place (fp32 CPU) with the paper's scheme. ``group_size`` 0 = paper's rule.
    Returns a summary: group sizes, layers quantized, fp32 and packed-quantized bytes."""
    if scheme != "8da4w":
        raise ValueError(f"unknown quantization scheme {scheme!r} (known: 8da4w)")
    quiet_torchao()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    gs = resolve_group_size(model.cfg, group_size)
    untie_head(model)
    check_group_sizes(model, gs, embedding_group_size)
    fp32_bytes = 4 * model.cfg.param_count()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model.float()
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(gs)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{embedding_bits}"),
                                          granularity=PerGroup(embedding_group_size)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    return {"scheme": scheme, "group_size": gs, "embedding_group_size": embedding_group_size,
            "embedding_bits": embedding_bits, "linear_layers": len(linears), "fp32_bytes": fp32_bytes,
            "quantized_bytes": quantized_bytes(model)}


def _bits(t: torch.Tensor) -> int:
    dt = getattr(t, "target_dtype", None)
    return {torch.int4: 4, torch.int8: 8}.get(dt, 8) if dt is not None else 8 * t.element_size()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the weights stored packed (int4 two per byte) plus their scales and zero points: what a
    runtime reads for every weight once per decoded token (the embedding excepted)."""
    total = 0
    for p in model.parameters():
        if hasattr(p, "qdata"):
            total += p.qdata.numel() * _bits(p) // 8 + p.scale.numel() * p.scale.element_size()
            zp = getattr(p, "zero_point", None)
            if zp is not None and bool(zp.any()):
                total += zp.numel() * zp.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def save_quantized(path: str | Path, model: Transformer, summary: dict[str, Any], tokenizer_spec: str = "") -> Path:
    """A checkpoint directory: ``config.json`` (our format plus a ``quantization`` block) and the quantized
    state dict in ``model.quant.pt``; written atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        torch.save(model.state_dict(), tmp / QUANT_WEIGHTS)
        write_json(tmp / CONFIG, {"format": FORMAT, "model": to_dict(model.cfg), "tokenizer": tokenizer_spec,
                                  "quantization": summary})
    return path


def is_quantized_dir(path: str | Path) -> bool:
    p = Path(path) / CONFIG
    try:
        return p.is_file() and "quantization" in json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return False


def load_quantized(path: str | Path) -> tuple[Transformer, dict[str, Any]]:
    """Load a :func:`save_quantized` directory: ``(quantized Transformer in eval mode, meta)``."""
    quiet_torchao()
    import torchao  # noqa: F401  (registers its tensor subclasses as safe to unpickle)

    path = Path(path)
    meta = read_meta(path)
    if "quantization" not in meta:
        raise CheckpointError(f"{path}: not a quantized checkpoint (no 'quantization' in {CONFIG})")
    weights = path / QUANT_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {QUANT_WEIGHTS}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    cfg = meta["config"]
    with torch.device("meta"):
        model = Transformer(cfg)
        untie_head(model)
    missing = sorted(set(dict(model.named_parameters())) - set(state))
    if missing:
        raise CheckpointError(f"{weights}: missing tensor {missing[0]!r}")
    model.load_state_dict(state, strict=True, assign=True)
    model.set_rope()
    return model.eval(), meta


__all__ = ["GroupSizeError", "auto_group_size", "check_group_sizes", "is_quantized_dir", "load_quantized",
           "quantize_model", "quantized_bytes", "save_quantized", "untie_head"]
