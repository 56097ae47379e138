"""Learning-rate schedules of the algorithms' optimizers."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_ratio``·lr at ``total_steps``.

    ``f(k) = k/warmup`` for ``k < warmup``; else ``min_ratio + (1 - min_ratio)·0.5·(1 + cos(π·p))``,
    ``p = min(1, (k - warmup)/(total - warmup))``. SHIFT App. C: 20 warm-up steps.

    Args:
        optimizer: the optimizer.
        warmup_steps: optimizer steps of linear warm-up (>= 0).
        total_steps: step at which the cosine reaches ``min_ratio``.
        min_ratio: final lr as a fraction of the base lr, in ``[0, 1]``.
    """

    def __init__(self, optimizer, warmup_steps: int = 20, total_steps: int = 1000, min_ratio: float = 0.0, last_epoch: int = -1):
        if warmup_steps < 0 or total_steps <= 0 or not 0 <= min_ratio <= 1:
            raise ValueError(f"WarmupCosineLR: bad warmup_steps={warmup_steps}, total_steps={total_steps}, min_ratio={min_ratio}")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
