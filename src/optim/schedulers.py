"""Learning-rate schedules stepped every optimizer step (not every epoch), so warmup and decay are
smooth whatever the dataset size."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warmup over `warmup_epochs` (the first step uses base/(warmup_steps+1)), then cosine decay
    that reaches `min_lr_ratio` x the base rate after the last step (Loshchilov & Hutter 2017, without
    restarts; Goyal et al. 2017 warmup).

    Built by `ClassifierLitModule.configure_optimizers` with the run's step counts; configs give
    only the shape (`_partial_: true`).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), self.total_steps - 1)
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
