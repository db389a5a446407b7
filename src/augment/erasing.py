"""Erasing augmentations: Cutout, RandomErasing, HideAndSeek and GridMask, vectorised over the batch with
per-sample randomness. They have no torchvision equivalent with PaddleClas's semantics, so their
streamed form runs the same code on one image (`OnOneImage`).

Fill values. PaddleClas applies these ops *after* normalisation and writes 0 (RandomErasing: its
`mean`, default 0) into the erased pixels. Here they run on [0, 1] images *before* normalisation, so
the configs fill with the data's mean (`${data.mean}`): that normalises to exactly 0, the same input
the network sees in PaddleClas. RandomErasing's random modes likewise draw N(0, 1) in normalised
units, i.e. `mean + std * N(0, 1)` here (`std: ${data.std}`); streamed data clips those to uint8.

Sizes. PaddleClas gives sizes in pixels of 224-pixel images (Cutout length 112, GridMask d1/d2
96/224, HideAndSeek grids 16..56). To fit any data, a size here is pixels when it is an int and a
fraction of the shorter image side when it is a float (0.5 = 112 px at 224 = 16 px on CIFAR, the
Cutout paper's CIFAR-10 length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from src.augment.boxes import box_mask, centered_boxes
from src.augment.ops import OnOneImage, check_param, check_range
from src.utils.errors import AutoclsError

Size = int | float


def _check_size(name: str, value: Size) -> None:
    ok = (isinstance(value, int) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)
    check_param(name, value, ok, "pixels (an int >= 0) or a fraction of the image side (a float in [0, 1])")


def _pixels(value: Size, side: int) -> int:
    """A size in pixels: ints are pixels, floats a fraction of `side`."""
    return value if isinstance(value, int) else round(value * side)


def _channel_values(values: float | Sequence[float]) -> tuple[float, ...]:
    """One value for every channel, or one per channel (a config list such as `${data.mean}`)."""
    return (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)


def _per_channel(values: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """(1, C, 1, 1) tensor of per-channel values for `x` (one value serves every channel)."""
    if len(values) not in (1, x.shape[1]):
        raise AutoclsError(
            f"an erasing fill has {len(values)} values for {x.shape[1]}-channel images; give one value per channel "
            "(the configs use ${data.mean})."
        )
    return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


class _Erasing(nn.Module):
    """What the erasing ops share: a per-channel `fill` and the streamed form."""

    is_crop = False

    def __init__(self, fill: float | Sequence[float]) -> None:
        super().__init__()
        self.fill = _channel_values(fill)

    def erase(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`fill` where the (B, 1, H, W) `mask` is True."""
        return torch.where(mask, _per_channel(self.fill, x), x)

    def sample_transform(self, image_size: int) -> nn.Module:
        return OnOneImage(self)


class Cutout(_Erasing):
    """Cutout (DeVries & Taylor 2017; PaddleClas `Cutout(n_holes=1, length=112)`): `n_holes` squares of
    side `length`, each centred on a uniformly random pixel and clipped at the border, are erased."""

    def __init__(self, n_holes: int = 1, length: Size = 0.5, fill: float | Sequence[float] = 0.0) -> None:
        super().__init__(fill)
        check_range("Cutout.n_holes", n_holes, 1, math.inf, integer=True)
        _check_size("Cutout.length", length)
        self.n_holes, self.length = int(n_holes), length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        length = _pixels(self.length, min(h, w))
        boxes = centered_boxes(b * self.n_holes, h, w, length, length, x.device)
        mask = box_mask(boxes, h, w).view(b, self.n_holes, h, w).any(dim=1, keepdim=True)
        return self.erase(x, mask)


class RandomErasing(_Erasing):
    """Random Erasing (Zhong et al. 2020), PaddleClas's parameters: with probability `EPSILON` erase a
    rectangle of area `uniform(sl, sh)` of the image and aspect ratio (h/w) `uniform(r1, 1/r1)` (log-
    uniform with `use_log_aspect`), at a uniform position; the first of `attempt` draws that fits inside
    the image is used, none fitting leaves the image as it is.

    `mode`: const fills `mean` (PaddleClas's erasing value, here in [0, 1] pixel units: `${data.mean}`
    is PaddleClas's default 0 after normalisation); rand draws one N(0, 1) value per channel and pixel
    draws one per pixel, in normalised units (`mean + std * N(0, 1)` here).
    """

    MODES = ("const", "rand", "pixel")

    def __init__(
        self,
        EPSILON: float = 0.5,  # PaddleClas's spelling
        sl: float = 0.02,
        sh: float = 0.4,
        r1: float = 0.3,
        attempt: int = 100,
        use_log_aspect: bool = False,
        mode: str = "const",
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
    ) -> None:
        super().__init__(mean)
        check_range("RandomErasing.EPSILON", EPSILON, 0.0, 1.0)
        check_range("RandomErasing.sl", sl, 0.0, 1.0)
        check_range("RandomErasing.sh", sh, sl, 1.0)
        check_param("RandomErasing.r1", r1, 0.0 < r1 <= 1.0, "a value in (0, 1]")
        check_range("RandomErasing.attempt", attempt, 1, math.inf, integer=True)
        check_param("RandomErasing.mode", mode, mode in self.MODES, f"one of {', '.join(self.MODES)}")
        self.EPSILON, self.sl, self.sh, self.r1, self.attempt = EPSILON, sl, sh, r1, int(attempt)
        self.use_log_aspect, self.mode = bool(use_log_aspect), mode
        self.std = _channel_values(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        # all attempts of all samples at once; each sample keeps its first box that fits
        area = torch.empty(b, self.attempt, device=dev).uniform_(self.sl, self.sh) * (h * w)
        if self.use_log_aspect:
            aspect = torch.empty(b, self.attempt, device=dev).uniform_(math.log(self.r1), -math.log(self.r1)).exp()
        else:
            aspect = torch.empty(b, self.attempt, device=dev).uniform_(self.r1, 1 / self.r1)
        box_h = torch.sqrt(area * aspect).round().long()
        box_w = torch.sqrt(area / aspect).round().long()
        fits = (box_h < h) & (box_w < w)
        first = fits.int().argmax(dim=1, keepdim=True)
        box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
        erase = (torch.rand(b, device=dev) < self.EPSILON) & fits.any(dim=1)
        y1 = (torch.rand(b, device=dev) * (h - box_h + 1)).long()
        x1 = (torch.rand(b, device=dev) * (w - box_w + 1)).long()
        mask = box_mask((y1, y1 + box_h, x1, x1 + box_w), h, w) & erase.view(-1, 1, 1, 1)
        return torch.where(mask, self._values(x), x)

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        mean = _per_channel(self.fill, x)
        if self.mode == "const":
            return mean
        shape = (x.shape[0], x.shape[1], 1, 1) if self.mode == "rand" else x.shape
        return mean + _per_channel(self.std, x) * torch.randn(shape, dtype=x.dtype, device=x.device)


class HideAndSeek(_Erasing):
    """Hide-and-Seek (Singh & Lee 2017; PaddleClas `HideAndSeek`): each sample draws a grid size from
    `grid_sizes` (0 = no hiding; PaddleClas 0, 16, 32, 44, 56 px at 224), cuts the image into cells of
    that size and hides each cell with probability `hide_prob` (0.5)."""

    def __init__(
        self, grid_sizes: Sequence[Size] = (0, 16, 32, 44, 56), hide_prob: float = 0.5, fill: float | Sequence[float] = 0.0
    ) -> None:
        super().__init__(fill)
        check_param("HideAndSeek.grid_sizes", grid_sizes, len(grid_sizes) > 0, "a non-empty list of sizes")
        for g in grid_sizes:
            _check_size("HideAndSeek.grid_sizes", g)
        check_range("HideAndSeek.hide_prob", hide_prob, 0.0, 1.0)
        self.grid_sizes, self.hide_prob = list(grid_sizes), hide_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        sizes = [_pixels(g, min(h, w)) for g in self.grid_sizes]
        n = -(-max(h, w) // min([s for s in sizes if s > 0], default=max(h, w)))  # most cells per side
        grid = torch.tensor(sizes, device=dev)[torch.randint(len(sizes), (b,), device=dev)].view(-1, 1, 1)
        cell = torch.where(grid > 0, grid, max(h, w))  # grid 0 hides nothing: one cell, masked out below
        rows = torch.arange(h, device=dev).view(1, h, 1) // cell  # (B, H, 1) cell row of each pixel row
        cols = torch.arange(w, device=dev).view(1, 1, w) // cell  # (B, 1, W)
        hidden = torch.rand(b, n, n, device=dev) < self.hide_prob
        mask = hidden[torch.arange(b, device=dev).view(-1, 1, 1), rows, cols] & (grid > 0)
        return self.erase(x, mask.unsqueeze(1))


class GridMask(_Erasing):
    """GridMask (Chen et al. 2020; PaddleClas `GridMask` and its parameter names): with probability
    `prob`, erase a grid. Per sample: period `d` in [d1, d2), stripe width `l = int(d * ratio + 0.5)`,
    random offsets in [0, d) along both axes, the grid rotated by a whole number of degrees in
    [0, rotate) (rotate=1 never rotates). Mode 0 erases the stripes (a fraction 1 - (1 - l/d)^2 of the
    image), mode 1 the squares between them (a fraction (1 - l/d)^2).

    Defaults are the authors' ImageNet run (d 96..224 px at 224, ratio 0.6, rotate 360, mode 1, prob
    0.8: about 16% erased). PaddleClas's config (ratio 0.5, rotate 1, mode 0, prob 1) erases the
    stripes, about 75% of every image.

    The mask is computed per pixel in closed form on PaddleClas's 1.5x canvas (rotated about its centre
    as PIL's `Image.rotate`), instead of drawing and rotating a mask image per sample.

    `prob` is the probability used now; `GridMaskRamp` raises it from 0 over the first epochs as
    PaddleClas does. It lives in shared memory, so streamed-data workers (which hold a copy of this op)
    see the callback's updates too.
    """

    def __init__(
        self,
        d1: Size = 0.43,
        d2: Size = 1.0,
        rotate: int = 360,
        ratio: float = 0.6,
        mode: int = 1,
        prob: float = 0.8,
        fill: float | Sequence[float] = 0.0,
    ) -> None:
        super().__init__(fill)
        _check_size("GridMask.d1", d1)
        _check_size("GridMask.d2", d2)
        check_range("GridMask.rotate", rotate, 1, 360, integer=True)
        check_range("GridMask.ratio", ratio, 0.0, 1.0)
        check_param("GridMask.mode", mode, mode in (0, 1), "0 (erase the stripes) or 1 (erase the squares)")
        self.d1, self.d2, self.rotate, self.ratio, self.mode = d1, d2, int(rotate), ratio, mode
        self._prob = torch.zeros((), dtype=torch.float64).share_memory_()
        self.prob = prob

    @property
    def prob(self) -> float:
        return float(self._prob)

    @prob.setter
    def prob(self, value: float) -> None:
        check_range("GridMask.prob", value, 0.0, 1.0)
        self._prob.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        d1 = max(1, _pixels(self.d1, min(h, w)))
        d2 = max(d1 + 1, _pixels(self.d2, min(h, w)))
        d = torch.randint(d1, d2, (b, 1, 1), device=dev)
        stripe = (d * self.ratio + 0.5).long()
        off_y = (torch.rand(b, 1, 1, device=dev) * d).long()
        off_x = (torch.rand(b, 1, 1, device=dev) * d).long()
        # PIL's rotate(r) samples the unrotated canvas at R(-r) @ p about the canvas centre
        phi = -torch.deg2rad(torch.randint(0, self.rotate, (b, 1, 1), device=dev).float())
        cos, sin = torch.cos(phi), torch.sin(phi)
        ch, cw = int(1.5 * h), int(1.5 * w)
        py = (torch.arange(h, device=dev) + (ch - h) // 2 + 0.5 - ch / 2).view(1, h, 1)  # image pixel centres,
        px = (torch.arange(w, device=dev) + (cw - w) // 2 + 0.5 - cw / 2).view(1, 1, w)  # canvas-centred
        row = torch.floor(-sin * px + cos * py + ch / 2).long()
        col = torch.floor(cos * px + sin * py + cw / 2).long()
        stripes = ((row - off_y) % d < stripe) | ((col - off_x) % d < stripe)
        mask = stripes if self.mode == 0 else ~stripes
        applies = torch.rand(b, 1, 1, device=dev) < self.prob
        return self.erase(x, (mask & applies).unsqueeze(1))
