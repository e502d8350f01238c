"""Learning-rate schedules: warmup-stable-decay (WSD) per stage, with the paper's exponential decay.

The LR is a pure function of (stage, step within the stage): resuming needs no scheduler state
beyond the step counter.
"""
from __future__ import annotations

import math

from sala.train.config import StageConfig


def stage_lr(stage: StageConfig, step: int, default_lr: float) -> float:
    """LR at optimizer step `step` (0-based) of `stage`.

    - warmup: linear from peak/warmup_steps up to the peak over `warmup_steps` steps;
    - stable: the peak (`stage.lr`, default `default_lr`);
    - decay over the last `decay_steps` steps (default: all steps after warmup), from the peak to
      `lr_end`: exponential lr = peak * (lr_end/peak)^p (the paper's short/long decay), linear or
      cosine; p runs from 0 at the decay's first step to 1 at the stage's last step.
    """
    peak = stage.lr if stage.lr is not None else default_lr
    if step < stage.warmup_steps:
        return peak * (step + 1) / stage.warmup_steps
    if stage.decay == "constant":
        return peak
    decay_steps = stage.decay_steps if stage.decay_steps is not None else stage.steps - stage.warmup_steps
    start = stage.steps - decay_steps
    if step < start:
        return peak
    p = (step - start) / max(1, decay_steps - 1)
    p = min(max(p, 0.0), 1.0)
    end = float(stage.lr_end)
    if stage.decay == "exponential":
        return peak * (end / peak) ** p
    if stage.decay == "linear":
        return peak + (end - peak) * p
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * p))


def schedule(stages: list[StageConfig], default_lr: float) -> list[float]:
    """LR of every optimizer step of all stages back to back (for plots and tests)."""
    return [stage_lr(s, i, default_lr) for s in stages for i in range(s.steps)]
