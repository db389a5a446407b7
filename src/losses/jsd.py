"""AugMix's Jensen-Shannon consistency term (Hendrycks et al. 2020, "AugMix", section 3).

With `augmentation.ops.augmix.jsd=true` every training image reaches the network three times: clean
and as two independent AugMix views, stacked along the batch (`[x, augmix(x), augmix(x)]`, 3B images
for B labels). The paper's loss is

    L = CE(p_clean, y) + lambda * JS(p_clean, p_aug1, p_aug2),
    JS(p_1, ..., p_k) = 1/k * sum_i KL(p_i || M),   M = 1/k * sum_i p_i,

with lambda = 12. `ClassifierLitModule` computes the first term with its own loss on the clean logits
and adds this module's output for the views; the term pulls the three predictions together, so the
network learns to answer the same for an image and its augmentations.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from src.utils.errors import AutoclsError

# The paper's code clamps the mixture to [1e-7, 1] before its log, so a class that every view gives
# (numerically) zero probability cannot produce log(0).
MIXTURE_FLOOR = 1e-7


def jensen_shannon(*logits: torch.Tensor) -> torch.Tensor:
    """The generalised Jensen-Shannon divergence of the softmax distributions of `logits` (each
    (B, C)): the mean of KL(p_i || M) over the k views, averaged over the batch (in float32)."""
    if len(logits) < 2:
        raise ValueError(f"the Jensen-Shannon divergence compares at least 2 distributions, got {len(logits)}")
    log_p = [F.log_softmax(z.float(), dim=1) for z in logits]
    p = [lp.exp() for lp in log_p]
    log_m = (torch.stack(p).mean(0)).clamp(MIXTURE_FLOOR, 1).log()
    kl = [(pi * (lpi - log_m)).sum(dim=1) for pi, lpi in zip(p, log_p)]
    return torch.stack(kl).mean(0).mean()


class JensenShannonConsistency(nn.Module):
    """`weight` x JS of the views' predictions: AugMix's consistency term (the paper's lambda is 12).
    Called with the clean logits and the augmented views' logits, each (B, C)."""

    def __init__(self, weight: float = 12.0) -> None:
        super().__init__()
        if not weight >= 0:
            raise AutoclsError(f"model.consistency.weight={weight} must be >= 0; the AugMix paper uses 12.")
        self.weight = float(weight)

    def forward(self, clean: torch.Tensor, *augmented: torch.Tensor) -> torch.Tensor:
        return self.weight * jensen_shannon(clean, *augmented)
