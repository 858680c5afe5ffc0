"""Learning-rate schedules (paper Table 2).

Every stage is "warm up linearly from 0, then decay to ``min_lr_ratio * lr`` by the last step":

- pre-training: 2k warm-up steps, linear decay to 0.1x (``warmup_steps = 2000``, ``min_lr_ratio = 0.1``);
- mid-training: no warm-up, linear decay to zero (``min_lr_ratio = 0``);
- SFT: warm-up over a ratio of the steps (0.03 general, 0.1 reasoning), then linear to zero.

``schedule = "cosine"`` decays along a half cosine instead, ``"constant"`` holds the peak after warm-up, and
``"wsd"`` (warm-up, stable, decay) holds it until the last ``decay_ratio`` of the steps, then decays linearly
to the floor: a short run learns at the peak for longer and still ends cooled down.
The lr is a pure function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

from ..config import ConfigError, StageConfig

SCHEDULES = ("linear", "cosine", "constant", "wsd")


def warmup_steps(stage: StageConfig, total_steps: int) -> int:
    if stage.warmup_steps:
        return min(stage.warmup_steps, total_steps)
    return int(round(stage.warmup_ratio * total_steps))


def lr_at(step: int, total_steps: int, stage: StageConfig) -> float:
    """The lr for optimizer step ``step`` (0-based) of ``total_steps``."""
    if stage.schedule not in SCHEDULES:
        raise ConfigError(f"schedule {stage.schedule!r} is not one of {SCHEDULES}")
    peak, floor = stage.lr, stage.lr * stage.min_lr_ratio
    warm = warmup_steps(stage, total_steps)
    if step < warm:
        return peak * (step + 1) / warm
    if stage.schedule == "constant":
        return peak
    start = warm
    if stage.schedule == "wsd":
        start = max(warm, total_steps - int(round(stage.decay_ratio * total_steps)))
        if step < start:
            return peak
    span = max(1, total_steps - start - 1)
    frac = min(1.0, (step - start) / span)
    if stage.schedule == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return peak + (floor - peak) * frac
