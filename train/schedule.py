"""Learning-rate schedules as pure functions of the step (unit-tested, no optimizer state)."""

from __future__ import annotations

import math

from train.config import LrSchedule, OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return round(cfg.warmup_fraction * total_steps)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Linear warmup from lr / warmup to lr over the warmup steps, then:
    constant; cosine from lr to min_lr at the last step; or WSD: lr until the last
    ``decay_fraction`` of the steps, then linear decay to min_lr at the last step."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule is LrSchedule.constant:
        return cfg.lr
    last = max(total_steps - 1, 1)
    if cfg.schedule is LrSchedule.cosine:
        progress = min((step - warmup) / max(last - warmup, 1), 1.0)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = max(total_steps - round(cfg.decay_fraction * total_steps), warmup)
    if step < decay_start:
        return cfg.lr
    progress = min((step - decay_start) / max(last - decay_start, 1), 1.0)
    return cfg.lr + (cfg.min_lr - cfg.lr) * progress
