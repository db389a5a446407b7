"""Batch mixing: Mixup and CutMix, and `BatchMixing`, which chooses between them as timm's `Mixup`
does and turns integer labels into probability targets.

Mixing needs the whole batch, so it runs only on the device: in the data module's
`on_after_batch_transfer`, after normalisation, for in-memory and streamed data alike. Each mixer pairs
every image with a partner from a random permutation of the batch (PaddleClas's `MixupOperator` /
`CutmixOperator`) and returns the mixed images and the weight `lam` of the image's own label.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from src.augment.boxes import box_mask, centered_boxes
from src.augment.ops import check_param, check_range
from src.utils.errors import AutoclsError


class _Mixer(nn.Module):
    """lam ~ Beta(alpha, alpha) (PaddleClas's `alpha`)."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        check_param(f"{type(self).__name__}.alpha", alpha, alpha > 0, "a value > 0")
        self.alpha = float(alpha)

    def sample_lambda(self, n: int, device: torch.device) -> torch.Tensor:
        alpha = torch.tensor(self.alpha, device=device)
        return torch.distributions.Beta(alpha, alpha).sample((n,))


class Mixup(_Mixer):
    """Mixup (Zhang et al. 2018; PaddleClas `MixupOperator(alpha=0.2)`): `lam * x + (1 - lam) * partner`."""

    def __init__(self, alpha: float = 0.2) -> None:
        super().__init__(alpha)

    def forward(self, x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = lam.view(-1, 1, 1, 1).to(x.dtype)
        return weight * x + (1 - weight) * partner, lam


class CutMix(_Mixer):
    """CutMix (Yun et al. 2019; the paper's alpha 1.0, PaddleClas `CutmixOperator`): paste from the
    partner a box of sides `int(side * sqrt(1 - lam))` centred on a random pixel and clipped at the
    border; `lam` becomes 1 - the pasted fraction of the image (PaddleClas, timm's `correct_lam`)."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha)

    def forward(self, x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        cut = torch.sqrt(1 - lam)
        boxes = centered_boxes(b, h, w, (h * cut).long(), (w * cut).long(), x.device)
        y1, y2, x1, x2 = boxes
        pasted = ((y2 - y1) * (x2 - x1)).to(lam.dtype) / (h * w)
        return torch.where(box_mask(boxes, h, w), partner, x), 1 - pasted


class BatchMixing(nn.Module):
    """Mixup and/or CutMix on a batch, with timm's `Mixup` switches: with probability `mix_prob` a
    sample (mode `elem`) or the whole batch (mode `batch`, the papers' and timm's default) is mixed;
    with both mixers configured, CutMix is chosen with probability `switch_prob`, else Mixup.

    Returns the images and (B, num_classes) probability targets
    `lam * onehot(y) + (1 - lam) * onehot(y_partner)`, where the one-hots may be label-smoothed
    (`label_smoothing`; leave the loss's own smoothing at 0 then, or the targets are smoothed twice).
    `num_classes` comes from the config (`${data.num_classes}`) or, where that is null until the data
    is read (image folders), from the data module's call.
    """

    MODES = ("batch", "elem")

    def __init__(
        self,
        mixup: Mixup | None = None,
        cutmix: CutMix | None = None,
        num_classes: int | None = None,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        mode: str = "batch",
    ) -> None:
        super().__init__()
        if mixup is None and cutmix is None:
            raise AutoclsError("augmentation.mixing has neither mixup nor cutmix; add one or remove mixing.")
        check_range("BatchMixing.mix_prob", mix_prob, 0.0, 1.0)
        check_range("BatchMixing.switch_prob", switch_prob, 0.0, 1.0)
        check_range("BatchMixing.label_smoothing", label_smoothing, 0.0, 1.0)
        check_param("BatchMixing.mode", mode, mode in self.MODES, f"one of {', '.join(self.MODES)}")
        self.mixup, self.cutmix, self.num_classes = mixup, cutmix, num_classes
        self.mix_prob, self.switch_prob, self.label_smoothing, self.mode = mix_prob, switch_prob, label_smoothing, mode

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, dev = images.shape[0], images.device
        n = 1 if self.mode == "batch" else b
        if self.mixup is not None and self.cutmix is not None:
            use_cutmix = torch.rand(n, device=dev) < self.switch_prob
        else:
            use_cutmix = torch.full((n,), self.cutmix is not None, device=dev)
        lam = torch.ones(n, device=dev)
        for mixer, chosen in ((self.mixup, ~use_cutmix), (self.cutmix, use_cutmix)):
            if mixer is not None:
                lam = torch.where(chosen, mixer.sample_lambda(n, dev), lam)
        lam = torch.where(torch.rand(n, device=dev) < self.mix_prob, lam, torch.ones_like(lam)).expand(b)
        use_cutmix = use_cutmix.expand(b)

        partner = torch.randperm(b, device=dev)
        out = images
        for mixer, chosen in ((self.mixup, ~use_cutmix), (self.cutmix, use_cutmix)):
            if mixer is not None:
                mixed, mixed_lam = mixer(images, images[partner], lam)
                out = torch.where(chosen.view(-1, 1, 1, 1), mixed, out)
                lam = torch.where(chosen, mixed_lam, lam)
        return out, self._targets(labels, partner, lam, self._resolve_num_classes(num_classes), images.dtype)

    def _targets(self, labels, partner, lam, num_classes: int, dtype) -> torch.Tensor:
        off = self.label_smoothing / num_classes
        onehot = F.one_hot(labels, num_classes).to(dtype) * (1 - self.label_smoothing) + off
        weight = lam.view(-1, 1).to(dtype)
        return weight * onehot + (1 - weight) * onehot[partner]

    def _resolve_num_classes(self, given: int | None) -> int:
        if self.num_classes is None and given is None:
            raise AutoclsError("Batch mixing needs the class count; set augmentation.mixing.num_classes.")
        if self.num_classes is not None and given is not None and self.num_classes != given:
            raise AutoclsError(
                f"augmentation.mixing.num_classes={self.num_classes} but the data has {given} classes; "
                "set it to ${data.num_classes}."
            )
        return int(self.num_classes or given)
