"""Throughput accounting: model FLOPs per token, device peak FLOP/s, MFU, and the metric sinks
(``metrics.jsonl`` + TensorBoard)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..config import TRAIN_DTYPES, ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, by a substring of the device name.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                 "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def flops_per_token(cfg: ModelConfig, seq_len: int, weight_sharing_apps: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 x every matmul weight as applied
    (blocks run twice under weight sharing count twice; the head once), plus causal attention scores and
    values, ``6 * S * n_heads * head_dim`` per block application (12 x S x h x hd halved by the mask)."""
    apps = weight_sharing_apps or cfg.n_layers * (2 if cfg.weight_sharing else 1)
    d, hd = cfg.dim, cfg.head_dim
    per_block = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + 3 * d * cfg.ffn_dim
    matmul = apps * per_block + cfg.vocab_size * d
    return 6.0 * matmul + 6.0 * apps * seq_len * cfg.n_heads * hd


_CPU_PEAK: dict[tuple[int, torch.dtype], float] = {}
FAST_BF16_RATIO = 1.3  # bf16 autocast pays for its casts only well above parity (measured: 2.5x matmuls -> 1.5x steps)


def measure_cpu_peak(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul FLOP/s in ``dtype`` at the current thread count (best of ``repeats``)."""
    key = (torch.get_num_threads(), dtype)
    if key not in _CPU_PEAK:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK[key] = 2 * n ** 3 / best
    return _CPU_PEAK[key]


def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul throughput on this CPU: about 2.5 where AVX-512 BF16 / AMX runs bf16 natively,
    well below 1 where bf16 is emulated (an AVX2-only host measured 6x slower)."""
    return measure_cpu_peak(dtype=torch.bfloat16) / measure_cpu_peak()


def use_bf16_autocast(dtype: str, device: torch.device) -> bool:
    """The training precision a ``--dtype`` asks for: ``bfloat16`` / ``float32`` as said; ``auto`` = bf16
    autocast on CUDA, fp32 on a CPU; ``fast`` = bf16 autocast on CUDA and on a CPU whose bf16 matmuls are
    measured :data:`FAST_BF16_RATIO` times faster than fp32, else fp32 (weights and optimizer stay fp32)."""
    if dtype not in TRAIN_DTYPES:
        raise ValueError(f"unknown training dtype {dtype!r} ({', '.join(TRAIN_DTYPES)})")
    if dtype in ("float32", "bfloat16"):
        return dtype == "bfloat16"
    if device.type == "cuda":
        return True
    return dtype == "fast" and cpu_bf16_speedup() >= FAST_BF16_RATIO


def device_peak(device: torch.device, bf16: bool = False) -> tuple[float | None, str]:
    """Peak FLOP/s of one device and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 dense (datasheet)"
        return None, f"{name} (no peak known)"
    dt = torch.bfloat16 if bf16 else torch.float32
    return measure_cpu_peak(dtype=dt), f"CPU {'bf16' if bf16 else 'fp32'} matmul, measured with {torch.get_num_threads()} threads"


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            # drop what a killed run logged after its last checkpoint: those steps are trained again
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(self.path)
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step)
        except ImportError:  # tensorboard is a dependency; keep training if a user removed it
            self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
