"""Focal loss for softmax classifiers (Lin et al. 2017, "Focal Loss for Dense Object Detection")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from src.losses.base import ClassificationLoss, class_vector
from src.utils.errors import AutoclsError


class FocalLoss(ClassificationLoss):
    """FL = sum_c -alpha_c w_c q_c (1 - p_c)^gamma log p_c, reduced over the batch like cross-entropy.

    p = softmax(logits / T); q is the (smoothed) target distribution, one-hot for class indices, so
    for hard targets this is the paper's -alpha_t (1 - p_t)^gamma log p_t, and for soft targets
    (Mixup/CutMix, distillation) its natural generalisation. The factor (1 - p_c)^gamma shrinks the
    loss of examples the model already classifies well, so training concentrates on hard ones.
    `gamma=0, alpha=null` is exactly `CrossEntropyLoss` with the same other arguments.

    `alpha` is the paper's class-balancing factor: one value per class, or a number a for a binary
    task, which weights class 1 (the rare/positive class, the paper's foreground) by a and class 0 by
    1 - a. Unlike `class_weights` it only scales the loss, it does not renormalise the batch mean.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        class_weights: str | Sequence[float] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(label_smoothing, temperature, class_weights, num_classes)
        if gamma < 0:
            raise AutoclsError(f"loss.gamma={gamma} must be >= 0 (0 is cross-entropy, 2 the focal loss paper's value).")
        self.gamma = gamma
        self.register_buffer("alpha", _alpha_vector(alpha, num_classes))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = self.log_probs(logits)
        loss = -self.target_distribution(target, log_p.shape[1]) * log_p
        if self.gamma:
            # 1 - p as -expm1(log p) is exact for confident predictions, where the factor matters;
            # the floor keeps the gradient finite for gamma < 1 when p rounds to 1
            loss = loss * (-torch.expm1(log_p)).clamp_min(1e-12).pow(self.gamma)
        for factor in (self.alpha, self.weight):
            if factor is not None:
                loss = loss * factor.float()
        return loss.sum() / self.batch_normaliser(target)


def _alpha_vector(alpha: float | Sequence[float] | None, num_classes: int | None) -> torch.Tensor | None:
    if alpha is None:
        return None
    if isinstance(alpha, (int, float)):
        if num_classes != 2:
            raise AutoclsError(
                f"loss.alpha={alpha} (a number) weights the two classes of a binary task as [1 - alpha, alpha] but "
                f"the data has {num_classes} classes; give loss.alpha one value per class, or null."
            )
        alpha = [1 - alpha, alpha]
    return class_vector("loss.alpha", alpha, num_classes)
