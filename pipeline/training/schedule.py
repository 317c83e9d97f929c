"""The learning-rate schedule of consistency training: linear warm-up, then cosine, linear or constant."""
from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("cosine", "linear", "constant")


def lr_lambda(schedule: str, warmup_steps: int, min_lr_ratio: float, total_steps: int) -> Callable[[int], float]:
    """The factor on the base learning rate at each optimizer step (for `torch.optim.lr_scheduler.LambdaLR`):
    it rises over `warmup_steps` steps to 1, then stays there (`constant`) or falls to `min_lr_ratio` at
    `total_steps`, along a straight line (`linear`) or half a cosine (`cosine`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - (1.0 - min_lr_ratio) * frac
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return factor
