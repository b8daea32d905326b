"""Learning-rate schedule: optional linear warmup, then cosine decay to an absolute floor."""

from __future__ import annotations

import math
from collections.abc import Callable


def cosine_with_floor(
    base_lr: float, min_lr: float, total_steps: int, warmup_steps: int = 0
) -> Callable[[int], float]:
    """A ``LambdaLR`` multiplier: ``lr(step) / base_lr``; reaches ``min_lr`` at ``total_steps``."""
    floor = min(min_lr, base_lr) / base_lr

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
