"""Schedules as pure functions of the global step (so a resumed run needs no extra state);
under ``train.budget_s`` the same functions of the clock (milliseconds of the budget).

* learning rate: lr * f(t), f linear warm-up ``(t + 1) / W`` for t < W steps, then cosine
  ``m + (1 - m) (1 + cos(pi (t - W) / (T - W))) / 2`` down to the ratio m = min_lr / lr;
* training eps: :func:`lipnext.losses.eps_schedule` at progress t / T.
"""
from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Warm-up + cosine learning-rate multiplier at (0-based) ``step`` of ``total_steps`` (steps,
    or milliseconds of a budget)."""
    if step < 0 or total_steps < 1:
        raise ValueError(f"need step >= 0 and total_steps >= 1, got {step}, {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
