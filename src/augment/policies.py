"""Policy augmentations: AutoAugment, RandAugment, TrivialAugment and AugMix.

Every sample draws its own ops and magnitudes on both paths:

* device (`op(x)`): the discrete draws (which op, which magnitude bin, its sign, whether it applies) are
  made on the CPU for the whole batch (B small integers), samples are grouped by op, and each op runs
  once per group with per-sample magnitudes (affine warps and colour blends vectorised over the
  group). Grouping on the CPU needs no device synchronisation.
* streamed (`op.sample_transform(image_size)`): torchvision's v2 transform of the same name on PIL images.

The op tables (op lists, magnitude bins and signs, AutoAugment's sub-policies) are read from those
torchvision classes, so both paths draw from one table. kornia 0.9 has AutoAugment, RandAugment and
TrivialAugment too, but they draw one sub-policy per *batch* (`rand_selector` runs once per forward),
so every image of a step gets the same ops; that is why they are not used.

The device ops follow torchvision's definitions on uint8 images (posterize keeps the top bits,
solarize inverts values >= the threshold, sharpness keeps the border) but stay in float between ops,
so they differ from the PIL path by rounding only. Images may have 1 or 3 channels (Color is the
identity on grayscale, as in torchvision).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from src.augment.ops import Views, check_param, check_range

INTERPOLATIONS = ("nearest", "bilinear")


# --- the ops, each on a float batch in [0, 1] with one magnitude per sample ---------------------


def _warp(x, a00, a01, t0, a10, a11, t1, *, fill: float, mode: str) -> torch.Tensor:
    """Resample `x` at `A @ p + t` for every output pixel `p` (pixel units, origin at the image centre,
    one `A`, `t` per sample); pixels from outside the image get `fill`."""
    n, _, h, w = x.shape
    sx, sy = w / 2, h / 2

    def per_sample(v) -> torch.Tensor:
        return torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(n)

    # grid_sample's coordinates (align_corners=False) are the centred pixel coordinates / half size
    theta = torch.stack(
        [
            torch.stack([per_sample(a00), per_sample(a01) * sy / sx, per_sample(t0) / sx], -1),
            torch.stack([per_sample(a10) * sx / sy, per_sample(a11), per_sample(t1) / sy], -1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # zero padding of (x - fill), shifted back, pads with `fill`
    return F.grid_sample(x - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill


def _shear_x(x, m, warp):
    # torchvision shears about the top-left corner (center=[0, 0]), as the original AutoAugment code
    return warp(x, 1, m, m * x.shape[-2] / 2, 0, 1, 0)


def _shear_y(x, m, warp):
    return warp(x, 1, 0, 0, m, 1, m * x.shape[-1] / 2)


def _translate_x(x, m, warp):
    return warp(x, 1, 0, -m.trunc(), 0, 1, 0)  # whole pixels, as torchvision's int(magnitude)


def _translate_y(x, m, warp):
    return warp(x, 1, 0, 0, 0, 1, -m.trunc())


def _rotate(x, m, warp):
    rad = torch.deg2rad(m)
    cos, sin = torch.cos(rad), torch.sin(rad)
    return warp(x, cos, -sin, 0, sin, cos, 0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (torchvision's rgb_to_grayscale); a 1-channel image is its own gray."""
    if x.shape[1] == 1:
        return x
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: factor 1 is `x`, 0 is `other`, above 1 extrapolates away from `other`."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _smoothed(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre weight 5) with the one-pixel border left as it is (torchvision)."""
    c, h, w = x.shape[1:]
    if h <= 2 or w <= 2:
        return x
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5
    out = x.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(x, (kernel / 13).expand(c, 1, 3, 3), groups=c)
    return out


def _posterize(x, m, warp):
    """Keep the top `m` bits of each 8-bit value (PIL's posterize)."""
    bits = m.long().view(-1, 1, 1, 1)
    keep = 256 - torch.pow(2, 8 - bits)  # 8 bits -> 0xFF, 0 bits -> 0x00
    return (x.mul(255).round_().long() & keep).to(x.dtype).div_(255)


OpFn = Callable[[torch.Tensor, torch.Tensor, Callable], torch.Tensor]

# torchvision's op names -> op(x, magnitude, warp); the magnitude is torchvision's: a shear factor,
# pixels, degrees, an enhancement offset (factor = 1 + m), bits, or a solarize threshold in [0, 1]
_OPS: dict[str, OpFn] = {
    "Identity": lambda x, m, warp: x,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
    "Brightness": lambda x, m, warp: _blend(x, torch.zeros_like(x), 1 + m),
    "Color": lambda x, m, warp: _blend(x, _gray(x), 1 + m),
    "Contrast": lambda x, m, warp: _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), 1 + m),
    "Sharpness": lambda x, m, warp: _blend(x, _smoothed(x), 1 + m),
    "Posterize": _posterize,
    "Solarize": lambda x, m, warp: torch.where(x >= m.view(-1, 1, 1, 1), 1 - x, x),
    "AutoContrast": lambda x, m, warp: TF.autocontrast(x),
    "Equalize": lambda x, m, warp: TF.equalize(x),
    "Invert": lambda x, m, warp: 1 - x,
}


# --- the policies ------------------------------------------------------------------------------


class _Policy(nn.Module):
    """Applies ops from a torchvision augmentation space, one op per sample per call of `_apply`.

    `space` maps op names to `(magnitudes(num_bins, height, width) or None, signed)`; `names` lists them
    with "Identity" first, which is how a sample that skips a step is encoded.
    """

    is_crop = False

    def __init__(self, space: dict, num_bins: int, fill: float, interpolation: str) -> None:
        super().__init__()
        name = type(self).__name__
        check_range(f"{name}.fill", fill, 0.0, 1.0)
        check_param(f"{name}.interpolation", interpolation, interpolation in INTERPOLATIONS, "nearest or bilinear")
        self.space, self.num_bins, self.fill, self.interpolation = space, num_bins, fill, interpolation
        self.names = ["Identity", *(k for k in space if k != "Identity")]
        self._drawable = torch.tensor([self.names.index(k) for k in space])  # what a uniform draw picks from
        self._signed = torch.tensor([k in space and space[k][1] for k in self.names])

    def _draw_ops(self, b: int) -> torch.Tensor:
        return self._drawable[torch.randint(len(self._drawable), (b,))]

    def _magnitudes(self, h: int, w: int) -> torch.Tensor:
        """(ops, bins) table of magnitudes for this image size; 0 for ops without one."""
        rows = []
        for k in self.names:
            values = self.space[k][0](self.num_bins, h, w) if k in self.space else None
            rows.append(torch.zeros(self.num_bins) if values is None else values.float())
        return torch.stack(rows)

    def _apply(self, x: torch.Tensor, ops: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """Apply op `names[ops[i]]` at magnitude bin `bins[i]` (random sign where the op is signed) to
        sample i; `ops` and `bins` are (B,) CPU tensors."""
        b, _, h, w = x.shape
        negate = self._signed[ops] & (torch.rand(b) < 0.5)
        magnitude = self._magnitudes(h, w)[ops, bins] * torch.where(negate, -1.0, 1.0)
        magnitude = magnitude.to(device=x.device, dtype=x.dtype)
        warp = partial(_warp, fill=self.fill, mode=self.interpolation)
        out = x.clone()
        for k in ops.unique().tolist():
            if k == 0:  # Identity
                continue
            idx = (ops == k).nonzero().squeeze(1).to(x.device)
            out[idx] = _OPS[self.names[k]](x[idx], magnitude[idx], warp)
        return out

    def _tv_kwargs(self) -> dict:
        return {"interpolation": self.interpolation, "fill": round(self.fill * 255)}


class AutoAugment(_Policy):
    """AutoAugment (Cubuk et al. 2019): each sample draws one of the 25 learned sub-policies of two ops,
    each op applied with its learned probability at its learned magnitude (bins of 10).

    `policy`: imagenet (PaddleClas `AutoAugment`/`ImageNetPolicy`), cifar10 or svhn. `fill` 0.5 is
    the grey (128) that PaddleClas and the original TF code fill rotated/sheared/translated-in areas
    with; `interpolation` nearest as there."""

    POLICIES = tuple(p.value for p in v2.AutoAugmentPolicy)

    def __init__(self, policy: str = "imagenet", fill: float = 0.5, interpolation: str = "nearest") -> None:
        check_param("AutoAugment.policy", policy, policy in self.POLICIES, f"one of {', '.join(self.POLICIES)}")
        super().__init__(v2.AutoAugment._AUGMENTATION_SPACE, 10, fill, interpolation)
        self.policy = policy
        subpolicies = v2.AutoAugment(v2.AutoAugmentPolicy(policy))._policies
        self._sub_ops = torch.tensor([[self.names.index(op) for op, _, _ in sub] for sub in subpolicies])
        self._sub_probs = torch.tensor([[p for _, p, _ in sub] for sub in subpolicies])
        self._sub_bins = torch.tensor([[m or 0 for _, _, m in sub] for sub in subpolicies])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        sub = torch.randint(len(self._sub_ops), (b,))
        for step in range(self._sub_ops.shape[1]):
            applies = torch.rand(b) <= self._sub_probs[sub, step]
            x = self._apply(x, torch.where(applies, self._sub_ops[sub, step], 0), self._sub_bins[sub, step])
        return x

    def sample_transform(self, image_size: int) -> v2.Transform:
        return v2.AutoAugment(v2.AutoAugmentPolicy(self.policy), **self._tv_kwargs())


class RandAugment(_Policy):
    """RandAugment (Cubuk et al. 2020): `num_layers` ops, each drawn uniformly per sample from 14
    (identity included), all at the one `magnitude`.

    `magnitude` counts levels 0..num_magnitude_bins-1; PaddleClas's `RandAugment(num_layers=2,
    magnitude=5)` works on the paper's 0..10 scale (`max_level=10`), which is `num_magnitude_bins=11`
    here (torchvision's default is 31 levels). `fill` and `interpolation` as `AutoAugment`."""

    def __init__(
        self,
        num_layers: int = 2,
        magnitude: int = 5,
        num_magnitude_bins: int = 11,
        fill: float = 0.5,
        interpolation: str = "nearest",
    ) -> None:
        check_range("RandAugment.num_layers", num_layers, 0, math.inf, integer=True)
        check_range("RandAugment.num_magnitude_bins", num_magnitude_bins, 2, math.inf, integer=True)
        check_range("RandAugment.magnitude", magnitude, 0, num_magnitude_bins - 1, integer=True)
        super().__init__(v2.RandAugment._AUGMENTATION_SPACE, int(num_magnitude_bins), fill, interpolation)
        self.num_layers, self.magnitude = int(num_layers), int(magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        for _ in range(self.num_layers):
            x = self._apply(x, self._draw_ops(b), torch.full((b,), self.magnitude))
        return x

    def sample_transform(self, image_size: int) -> v2.Transform:
        return v2.RandAugment(self.num_layers, self.magnitude, self.num_bins, **self._tv_kwargs())


class TrivialAugment(_Policy):
    """TrivialAugment Wide (Müller & Hutter 2021): one op per sample, drawn uniformly, at a uniformly
    drawn magnitude level out of `num_magnitude_bins` (31 in the paper's wide space). PaddleClas has no
    TrivialAugment; `fill` 0.5 is the grey of the paper's code."""

    def __init__(self, num_magnitude_bins: int = 31, fill: float = 0.5, interpolation: str = "nearest") -> None:
        check_range("TrivialAugment.num_magnitude_bins", num_magnitude_bins, 2, math.inf, integer=True)
        super().__init__(v2.TrivialAugmentWide._AUGMENTATION_SPACE, int(num_magnitude_bins), fill, interpolation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return self._apply(x, self._draw_ops(b), torch.randint(self.num_bins, (b,)))

    def sample_transform(self, image_size: int) -> v2.Transform:
        return v2.TrivialAugmentWide(self.num_bins, **self._tv_kwargs())


class AugMix(_Policy):
    """AugMix (Hendrycks et al. 2020): `mixture_width` chains of `chain_depth` random ops (-1: 1 to 3 per
    chain and sample) at a random level below `severity` (of 10), mixed with Dirichlet(`alpha`)
    weights, then blended with the original by m ~ Beta(`alpha`, `alpha`):
    `m * x + (1 - m) * sum_i w_i * chain_i(x)` per sample.

    Defaults are the paper's (severity 3, width 3, depth -1, alpha 1, bilinear, black fill) with
    `all_ops=false`: without brightness/color/contrast/sharpness, the ops that overlap the ImageNet-C
    corruptions the paper evaluates on (torchvision's default is all ops).

    `jsd=true` is the paper's Jensen-Shannon consistency variant: the op returns `[x, augmix(x),
    augmix(x)]` concatenated (3B images for B labels; streamed: the three views of each image stacked,
    (3, C, H, W), which the data module lays out the same way), and `ClassifierLitModule` splits the
    logits into the three views: its loss on the clean third + `model.consistency` (lambda x JSD of
    the three, `src.losses.jsd`). It triples the images per step, so it is off by default.
    """

    def __init__(
        self,
        severity: int = 3,
        mixture_width: int = 3,
        chain_depth: int = -1,
        alpha: float = 1.0,
        all_ops: bool = False,
        jsd: bool = False,
        fill: float = 0.0,
        interpolation: str = "bilinear",
    ) -> None:
        check_range("AugMix.severity", severity, 1, 10, integer=True)
        check_range("AugMix.mixture_width", mixture_width, 1, math.inf, integer=True)
        check_param("AugMix.chain_depth", chain_depth, chain_depth == -1 or chain_depth >= 1, "-1 (random 1..3) or an integer >= 1")
        check_param("AugMix.alpha", alpha, alpha > 0, "a value > 0")
        space = v2.AugMix._AUGMENTATION_SPACE if all_ops else v2.AugMix._PARTIAL_AUGMENTATION_SPACE
        super().__init__(space, 10, fill, interpolation)  # torchvision's _PARAMETER_MAX levels
        self.severity, self.mixture_width, self.chain_depth = int(severity), int(mixture_width), int(chain_depth)
        self.alpha, self.all_ops, self.jsd = float(alpha), bool(all_ops), bool(jsd)
        self.views = 3 if self.jsd else 1  # images out per image in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.jsd:
            return torch.cat([x, self._augmix(x), self._augmix(x)])
        return self._augmix(x)

    def _augmix(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        m = torch.distributions.Beta(self.alpha, self.alpha).sample((b,)).to(x).view(-1, 1, 1, 1)
        w = torch.distributions.Dirichlet(torch.full((self.mixture_width,), self.alpha)).sample((b,)).to(x)
        mixed = torch.zeros_like(x)
        for i in range(self.mixture_width):
            if self.chain_depth > 0:
                depth = torch.full((b,), self.chain_depth)
            else:
                depth = torch.randint(1, 4, (b,))
            chain = x
            for step in range(int(depth.max())):
                ops = torch.where(depth > step, self._draw_ops(b), 0)  # shorter chains idle (Identity)
                chain = self._apply(chain, ops, torch.randint(self.severity, (b,)))
            mixed += w[:, i].view(-1, 1, 1, 1) * chain
        return m * x + (1 - m) * mixed

    def sample_transform(self, image_size: int) -> v2.Transform:
        augmix = v2.AugMix(self.severity, self.mixture_width, self.chain_depth, self.alpha, self.all_ops, **self._tv_kwargs())
        if self.jsd:
            return Views([v2.Identity(), augmix, augmix])
        return augmix
