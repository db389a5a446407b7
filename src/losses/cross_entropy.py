"""Cross-entropy for hard and soft targets."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from src.losses.base import ClassificationLoss


class CrossEntropyLoss(ClassificationLoss):
    """Cross-entropy with temperature, label smoothing (Szegedy et al. 2016) and class weights.

    Targets are class indices `(B,)` or probabilities `(B, C)` (Mixup/CutMix, distillation); smoothing
    applies to both, mixing the target with the uniform distribution by `label_smoothing`. The batch
    reduction is `F.cross_entropy`'s: a weighted mean for weighted class-index targets, else a mean.
    See `ClassificationLoss` for the arguments.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.scaled(logits), target, weight=self.weight, label_smoothing=self.label_smoothing)
