"""Cross-entropy for hard and soft targets."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class CrossEntropyLoss(nn.Module):
    """Cross-entropy with label smoothing (Szegedy et al. 2016).

    Targets are class indices `(B,)` or probabilities `(B, C)` (Mixup/CutMix, distillation); smoothing
    applies to both, mixing the target with the uniform distribution by `label_smoothing`.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # float32 log-softmax: bf16 logits lose too much precision in the normaliser
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
