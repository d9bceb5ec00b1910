"""Learning-rate schedules as pure functions of the step.

The loop sets ``lr = optim.lr × lr_multiplier(step)`` on the optimizer before every update, where
``step`` counts optimizer steps taken so far (skipped ones included, as in Megatron). So the LR needs
no state of its own in a checkpoint and is the same after any resume, on any number of ranks.
"""

from __future__ import annotations

import math

from pipeline.config import OptimConfig


def warmup(step: int, warmup_steps: int) -> float | None:
    """Linear warmup: (step + 1) / warmup_steps while step < warmup_steps, else None."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    return None


def cosine(progress: float, min_ratio: float) -> float:
    """1 → min_ratio along half a cosine as progress goes 0 → 1."""
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(progress: float, min_ratio: float) -> float:
    """1 → min_ratio in a straight line as progress goes 0 → 1."""
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def wsd(step: int, max_steps: int, decay_fraction: float, min_ratio: float) -> float:
    """Warmup-stable-decay after warmup: 1 until the last ``decay_fraction`` of max_steps, then linear
    to min_ratio at max_steps (Hu et al., MiniCPM 2024)."""
    decay_steps = max(1, round(decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return 1.0
    return linear((step - decay_start) / decay_steps, min_ratio)


def lr_multiplier(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The share of ``optim.lr`` used by update number ``step`` (0-based) of a ``max_steps`` run."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    w = warmup(step, optim.warmup_steps)
    if w is not None:
        return w
    if optim.schedule == "wsd":
        return wsd(step, max_steps, optim.wsd_decay_fraction, optim.min_lr_ratio)
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    if optim.schedule == "linear":
        return linear(progress, optim.min_lr_ratio)
    return cosine(progress, optim.min_lr_ratio)
