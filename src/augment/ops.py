"""Augmentation operations that run two ways from one config.

`op(x)` transforms a float batch `(B, C, H, W)` in [0, 1] on the training device, each sample with its
own random parameters (in-memory data). `op.sample_transform(image_size)` returns the equivalent
per-sample torchvision v2 transform for data streamed from disk, which runs in DataLoader workers on
PIL images. A crop op also fixes the output size, so it comes first.

The other ops live beside these: `policies` (AutoAugment, RandAugment, TrivialAugment, AugMix),
`erasing` (Cutout, RandomErasing, HideAndSeek, GridMask) and `mixing` (Mixup, CutMix on batches).
This module also holds what they all share: parameter checks and `OnOneImage`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from src.utils.errors import AutoclsError


def check_param(name: str, value, ok: bool, valid: str) -> None:
    """Reject a bad parameter when the config is instantiated (not mid-run) with one sentence naming the
    valid values."""
    if not ok:
        raise AutoclsError(f"augmentation parameter {name}={value!r} is invalid; use {valid}.")


def check_range(name: str, value: float, low: float, high: float, integer: bool = False) -> None:
    """`check_param` for a number in [low, high], optionally an integer."""
    ok = low <= value <= high and (not integer or float(value).is_integer())
    check_param(name, value, ok, f"{'an integer' if integer else 'a value'} in [{low}, {high}]")


class OnOneImage(nn.Module):
    """The per-sample form of a batch op that torchvision lacks: runs `op` on a batch of one image (PIL
    or uint8 CHW in, uint8 CHW out), so the device and the streamed path share one implementation.
    Values the op writes outside [0, 1] (e.g. RandomErasing's noise) are clipped by the uint8 result."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, image) -> torch.Tensor:
        x = image if isinstance(image, torch.Tensor) else TF.pil_to_tensor(image)
        out = self.op(x.unsqueeze(0).float().div(255)).squeeze(0)
        return out.mul(255).round_().clamp_(0, 255).to(torch.uint8)


class Views(nn.Module):
    """The per-sample form of an op that makes several views of each image (AugMix `jsd=true`):
    every branch transforms the image, `after` (the ops that follow it in the pipeline and the
    tensor conversion) runs on each view on its own, and the views come back stacked, (V, C, H, W).
    `Augmentation.sample_transform` fills in `after`."""

    def __init__(self, branches, after=None) -> None:
        super().__init__()
        self.branches, self.after = list(branches), after

    def forward(self, image) -> torch.Tensor:
        return torch.stack([self.after(branch(image)) for branch in self.branches])


class PadCrop(nn.Module):
    """Pad by `padding` pixels and take a random crop of the original size (He et al. 2016, CIFAR).

    `padding_mode`: `constant` pads with `fill`; `reflect` mirrors the border (no artificial edges;
    airbench's 2-pixel translation)."""

    is_crop = True
    PADDING_MODES = ("constant", "reflect")

    def __init__(self, padding: int = 4, fill: float = 0.0, padding_mode: str = "constant") -> None:
        super().__init__()
        check_param("PadCrop.padding_mode", padding_mode, padding_mode in self.PADDING_MODES, "constant or reflect")
        self.padding, self.fill, self.padding_mode = padding, fill, padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.padding
        if self.padding_mode == "reflect":
            padded = nn.functional.pad(x, (p, p, p, p), mode="reflect")
        else:
            padded = nn.functional.pad(x, (p, p, p, p), value=self.fill)
        dy = torch.randint(0, 2 * p + 1, (b, 1, 1), device=x.device)
        dx = torch.randint(0, 2 * p + 1, (b, 1, 1), device=x.device)
        rows = dy + torch.arange(h, device=x.device).view(1, h, 1)  # (B, H, 1)
        cols = dx + torch.arange(w, device=x.device).view(1, 1, w)  # (B, 1, W)
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        # advanced indexing gathers a different window per sample in one kernel: (B, H, W, C)
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)

    def sample_transform(self, image_size: int) -> v2.Transform:
        return v2.Compose(
            [
                v2.Resize(image_size),
                v2.CenterCrop(image_size),
                v2.RandomCrop(image_size, padding=self.padding, fill=round(self.fill * 255), padding_mode=self.padding_mode),
            ]
        )


class RandomResizedCrop(nn.Module):
    """Inception-style crop: a random area fraction in `scale` and aspect ratio in `ratio` (log-uniform),
    resized to `size` (Szegedy et al. 2015; PaddleClas RandCropImage)."""

    is_crop = True

    def __init__(
        self, size: int, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
    ) -> None:
        super().__init__()
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

    def _boxes(self, b: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Sample one crop box (x1, y1, x2, y2) per image, clamped to the image."""
        area = torch.empty(b, device=device).uniform_(*self.scale) * h * w
        log_r = torch.empty(b, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_r)
        cw = torch.sqrt(area * aspect).clamp(1, w)
        ch = torch.sqrt(area / aspect).clamp(1, h)
        x1 = torch.rand(b, device=device) * (w - cw)
        y1 = torch.rand(b, device=device) * (h - ch)
        return torch.stack([x1, y1, x1 + cw, y1 + ch], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x1, y1, x2, y2 = self._boxes(b, h, w, x.device).unbind(1)
        # an affine sampling grid per image maps the output square onto its crop box (bilinear)
        lin = torch.linspace(0, 1, self.size, device=x.device, dtype=x.dtype)
        gx = (x1[:, None] + (x2 - x1)[:, None] * lin) / w * 2 - 1  # (B, S) in [-1, 1]
        gy = (y1[:, None] + (y2 - y1)[:, None] * lin) / h * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        return nn.functional.grid_sample(x, grid.to(x.dtype), mode="bilinear", align_corners=True)

    def sample_transform(self, image_size: int) -> v2.Transform:
        return v2.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio, antialias=True)


class HorizontalFlip(nn.Module):
    """Mirror each image left-right with probability `p`."""

    is_crop = False

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        check_range("HorizontalFlip.p", p, 0.0, 1.0)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.p
        return torch.where(flip, x.flip(-1), x)

    def sample_transform(self, image_size: int) -> v2.Transform:
        return v2.RandomHorizontalFlip(self.p)
