"""What the classification losses share: temperature, label smoothing and class weights.

Class weights are either given (`[w0, w1, ...]`) or `balanced`: n_samples / (n_classes * count_c),
scikit-learn's definition (King & Zeng 2001, "Logistic regression in rare events data"), computed
from the train split's label counts. A loss cannot see the data when it is built, so a `balanced`
loss says so with `wants_class_counts` and `ClassifierLitModule.setup` hands it the counts through
`set_class_counts`. The weights are a buffer: they follow the module to the device and are saved in
(and restored from) checkpoints, so evaluating a checkpoint needs no counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from src.utils.errors import AutoclsError


def balanced_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """n_samples / (n_classes * count_c) for per-class sample counts `(C,)`: scikit-learn's
    `compute_class_weight("balanced")`, so every class carries the same total weight."""
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise AutoclsError(
            f"loss.class_weights=balanced needs training images of every class but class(es) {empty} have none; "
            f"give explicit loss.class_weights or fix the data."
        )
    counts = counts.double()
    return (counts.sum() / (len(counts) * counts)).float()


def class_vector(name: str, values: Sequence[float], num_classes: int | None) -> torch.Tensor:
    """A per-class config list as a float tensor, or one sentence when its length is not the class count."""
    if num_classes is None:
        # configs interpolate `${data.num_classes}`; only direct Python use can forget it
        raise ValueError(f"{name} per class needs num_classes")
    values = torch.tensor(list(values), dtype=torch.float32)
    if values.ndim != 1 or len(values) != num_classes:
        raise AutoclsError(
            f"{name} has {values.numel()} values but the data has {num_classes} classes; give one value per class."
        )
    return values


class ClassificationLoss(nn.Module):
    """Base of the losses in this package; subclasses implement `forward(logits, target)`.

    Targets are class indices `(B,)` or probabilities `(B, C)` (Mixup/CutMix, distillation).
    * `temperature` T divides the logits before the softmax (T > 1 flattens it, T < 1 sharpens it;
      Hinton et al. 2015);
    * `label_smoothing` mixes the target with the uniform distribution (Szegedy et al. 2016);
    * `class_weights`: null, `balanced` (set from the train split's counts) or one weight per class.
    `num_classes` (`${data.num_classes}` in the configs) sizes and checks the per-class values.
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        class_weights: str | Sequence[float] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise AutoclsError(f"loss.label_smoothing={label_smoothing} must be in [0, 1) (0.1 is the usual value).")
        if not temperature > 0:
            raise AutoclsError(f"loss.temperature={temperature} must be positive (1 leaves the logits unchanged).")
        self.label_smoothing, self.temperature = label_smoothing, temperature
        self.wants_class_counts = class_weights == "balanced"
        if isinstance(class_weights, str) and not self.wants_class_counts:
            raise AutoclsError(
                f"loss.class_weights={class_weights!r} is not a weighting; use null, balanced or a list of weights."
            )
        weights = None
        if self.wants_class_counts:
            # ones of the right shape (so a checkpoint restores into it) until set_class_counts fills them
            weights = class_vector("loss.class_weights", [1.0] * (num_classes or 0), num_classes)
        elif class_weights is not None:
            weights = class_vector("loss.class_weights", class_weights, num_classes)
        self.register_buffer("class_weights", weights)

    def set_class_counts(self, counts: torch.Tensor) -> None:
        """Train-split images per class `(C,)`: sets `balanced` weights (other weightings ignore it)."""
        if self.wants_class_counts:
            weights = balanced_class_weights(counts)
            if len(weights) != len(self.class_weights):
                raise AutoclsError(
                    f"The train split has {len(weights)} classes but loss.num_classes={len(self.class_weights)}; "
                    f"leave loss.num_classes to ${{data.num_classes}}."
                )
            self.class_weights.copy_(weights)

    @property
    def weight(self) -> torch.Tensor | None:
        """The class weights in float32 (a `bf16-true` run casts buffers too), or None."""
        return None if self.class_weights is None else self.class_weights.float()

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """log softmax(logits / T) in float32 (bf16 logits lose too much precision in the normaliser)."""
        return F.log_softmax(self.scaled(logits), dim=1)

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """The float32 logits divided by the temperature."""
        logits = logits.float()
        return logits / self.temperature if self.temperature != 1.0 else logits

    def target_distribution(self, target: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Class indices or probabilities -> smoothed probabilities `(B, C)`: (1 - eps) q + eps / C."""
        q = target.float() if target.is_floating_point() else F.one_hot(target, num_classes).float()
        eps = self.label_smoothing
        return q * (1 - eps) + eps / num_classes if eps else q

    def batch_normaliser(self, target: torch.Tensor) -> torch.Tensor | int:
        """What the summed loss is divided by, as in `F.cross_entropy`: the summed weight of the true
        classes for weighted class-index targets (a weighted mean), else the batch size."""
        if self.class_weights is not None and not target.is_floating_point():
            return self.weight[target].sum()
        return len(target)
