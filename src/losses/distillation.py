"""Distillation losses: how far a student's predictions are from a frozen teacher's.

Two divergences between the softened distributions p_s = softmax(s / T) and p_t = softmax(t / T)
of student logits s and teacher logits t, both summed over classes and averaged over the batch
(PyTorch's `batchmean`, the true mean KL per sample):

* `kl` — knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural
  Network"): KL(p_t || p_s), the teacher's distribution as the target. It is multiplied by T^2
  because the gradient of the softened term shrinks as 1/T^2; the scaling keeps its weight
  against the hard-label term unchanged when T is tuned (the paper's recommendation, timm's too).
* `sym_kl` — the SSLD loss as PaddleClas computes it: (KL(p_t || p_s) + KL(p_s || p_t)) / 2.
  PaddleClas calls it "JS divergence" (`JSDivLoss._jsdiv`), but it averages the two KL
  directions instead of measuring both against the mixture m. The difference matters: near
  agreement (p_s = p_t + d) it is sum d^2 / (2 p), the same as KL, so it trains as fast as KD;
  the textbook JS below is a quarter of that and saturates at log 2 when the two disagree.
* `js` — the textbook Jensen-Shannon divergence: (KL(p_s || m) + KL(p_t || m)) / 2 with
  m = (p_s + p_t) / 2. Symmetric and bounded by log 2; its gradient is about a quarter of KL's
  near agreement, so a student learning from it alone needs a far longer schedule (measured in
  docs/distillation.md).
Both symmetric divergences are scaled by T^2 as well, for the same reason as KL.

`DistillationLoss` mixes the divergence with the run's classification loss on the labels:
alpha * divergence + (1 - alpha) * hard_loss. With alpha = 1 the labels are not used at all
(SSLD; logits-only distillation). Unlabeled samples (label -1, see
`src.datamodules.unlabeled`) count only in the divergence, never in the hard-label term.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from src.utils.errors import AutoclsError

DIVERGENCES = ("kl", "sym_kl", "js")


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), summed over classes, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def symmetric_kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * (KL(p_t || p_s) + KL(p_s || p_t)) / 2 of the softened distributions (PaddleClas's SSLD
    loss), summed over classes, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl_ts = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    kl_st = F.kl_div(log_p_t, log_p_s, reduction="batchmean", log_target=True)
    return 0.5 * (kl_ts + kl_st) * temperature**2


def js_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * JS(softmax(s / T), softmax(t / T)), summed over classes, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    # log m from the log-probabilities: exact where a probability underflows to 0
    log_m = torch.logaddexp(log_p_s, log_p_t) - math.log(2.0)
    kl_s = F.kl_div(log_m, log_p_s, reduction="batchmean", log_target=True)
    kl_t = F.kl_div(log_m, log_p_t, reduction="batchmean", log_target=True)
    return 0.5 * (kl_s + kl_t) * temperature**2


def labelled_rows(target: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the samples that have a label: class indices >= 0, or any probability
    target (batch mixing never sees unlabeled samples, see `src.datamodules.unlabeled`)."""
    if target.is_floating_point():
        return torch.ones(len(target), dtype=torch.bool, device=target.device)
    return target >= 0


class DistillationLoss(nn.Module):
    """alpha * divergence(student, teacher) + (1 - alpha) * hard_loss(student, labels).

    Args:
        divergence: `kl` (knowledge distillation), `sym_kl` (SSLD) or `js`; see the module docstring.
        temperature: T, softens both distributions; Hinton et al. use 2-20, CIFAR KD commonly 4,
            SSLD 1.
        alpha: Weight of the divergence; 1 distils from the teacher's logits only (labels unused).

    `forward(student_logits, teacher_logits, target, hard_loss)`: `target` is class indices (-1 for
    unlabeled samples) or probabilities (Mixup/CutMix, which the hard-label term then uses);
    `hard_loss` is the run's classification loss (the `loss` config group), applied to the labelled
    samples only. Both may be None when alpha is 1.
    """

    def __init__(self, divergence: str = "kl", temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            raise AutoclsError(
                f"model.distillation.divergence={divergence!r} is not a divergence; use kl (knowledge distillation), "
                "sym_kl (SSLD as PaddleClas computes it) or js (the textbook Jensen-Shannon divergence)."
            )
        if not temperature > 0:
            raise AutoclsError(f"model.distillation.temperature={temperature} must be > 0; 4 is usual for KD, 1 for SSLD.")
        if not 0.0 <= alpha <= 1.0:
            raise AutoclsError(
                f"model.distillation.alpha={alpha} must be in [0, 1] (the weight of the teacher term; 1 ignores the labels)."
            )
        self.divergence, self.temperature, self.alpha = divergence, float(temperature), float(alpha)
        self._divergence_fn = {"kl": kd_divergence, "sym_kl": symmetric_kl_divergence, "js": js_divergence}[divergence]

    @property
    def uses_labels(self) -> bool:
        return self.alpha < 1.0

    def soft_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The divergence over every sample, labelled or not."""
        return self._divergence_fn(student_logits, teacher_logits.detach(), self.temperature)

    def hard_term(self, student_logits: torch.Tensor, target: torch.Tensor, hard_loss: nn.Module) -> torch.Tensor:
        """The classification loss over the labelled samples only (0 when the batch has none)."""
        labelled = labelled_rows(target)
        if not bool(labelled.any()):
            return student_logits.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) intact
        return hard_loss(student_logits[labelled], target[labelled])

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor | None = None,
        hard_loss: nn.Module | None = None,
    ) -> torch.Tensor:
        soft = self.soft_term(student_logits, teacher_logits)
        if not self.uses_labels:
            return soft
        if target is None or hard_loss is None:
            raise ValueError(f"alpha={self.alpha} < 1 needs the targets and the hard-label loss")
        return self.alpha * soft + (1.0 - self.alpha) * self.hard_term(student_logits, target, hard_loss)
