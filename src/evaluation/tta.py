"""Test-time augmentation (TTA): average the logits of a few views of each test image.

Modes:

* `none`: the network's logits for the images as given.
* `flip`: the mean of the logits of `x` and of its horizontal mirror `x.flip(-1)` (2 passes).
* `multicrop`: the ten-crop of Krizhevsky et al. (2012) applied to the already preprocessed test
  image: five square crops covering `MULTICROP_FRACTION` (87.5%) of each side (the four corners and
  the centre), each resized back to the input size with bilinear interpolation, so the network sees
  the size it was trained at (and the objects slightly enlarged), plus the horizontal mirror of each
  crop; the mean of the ten logits (10 passes).

Logits (not probabilities) are averaged, so `tta_logits(...)` is a drop-in for `net(images)`; their
softmax is a geometric-mean ensemble of the views.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from src.utils.errors import AutoclsError

TTA_MODES = ("none", "flip", "multicrop")
MULTICROP_FRACTION = 0.875


def tta_logits(net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Logits (B, num_classes) of `net` for `images` (B, C, H, W) under the TTA `mode`."""
    if mode == "none":
        return net(images)
    if mode == "flip":
        return (net(images) + net(images.flip(-1))) / 2
    if mode == "multicrop":
        views = multicrop_views(images)
        total = None
        for view in views:
            logits = net(view)
            total = logits if total is None else total + logits
        return total / len(views)
    raise AutoclsError(f"Unknown tta mode '{mode}'; use one of {', '.join(TTA_MODES)}.")


def multicrop_views(images: torch.Tensor, fraction: float = MULTICROP_FRACTION) -> list[torch.Tensor]:
    """The ten views of `multicrop`: 4 corner crops + the centre crop, each resized back to the input
    size, and the horizontal mirror of each."""
    height, width = images.shape[-2:]
    ch, cw = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - ch) // 2, (width - cw) // 2
    corners = [(0, 0), (0, width - cw), (height - ch, 0), (height - ch, width - cw), (top, left)]
    views = []
    for y, x in corners:
        crop = images[..., y : y + ch, x : x + cw]
        if (ch, cw) != (height, width):
            crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
        views.extend((crop, crop.flip(-1)))
    return views


class TTANet(nn.Module):
    """`net` whose forward is `tta_logits(net, x, mode)`: swapped in for a network during testing so
    that every metric of the test loop describes the test-time-augmented predictions."""

    def __init__(self, net: nn.Module, mode: str) -> None:
        super().__init__()
        if mode not in TTA_MODES:
            raise AutoclsError(f"Unknown tta mode '{mode}'; use one of {', '.join(TTA_MODES)}.")
        self.net, self.mode = net, mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.net, images, self.mode)
