"""Feature-map regularisers for the CIFAR ResNets that timm does not provide.

Drop path (stochastic depth) and DropBlock come from `timm.layers`; this module adds Disout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.utils.errors import AutoclsError


def block_mask(x: torch.Tensor, prob: float | torch.Tensor, block_size: int) -> torch.Tensor:
    """A 0/1 mask shaped like `x` (N, C, H, W) whose ones form square blocks covering about `prob` of
    each feature map, drawn independently per sample and channel.

    The blocks are DropBlock's (Ghiasi et al. 2018, "DropBlock: A regularization method for
    convolutional networks", Algorithm 1): seeds are drawn only where a whole block fits, with

        gamma = prob * H * W / (b_h * b_w * (H - b_h + 1) * (W - b_w + 1)),   b = min(block_size, side),

    so that the blocks add up to `prob` of the map in expectation (the masked fraction is slightly
    lower, as blocks overlap).
    """
    n, c, h, w = x.shape
    bh, bw = min(block_size, h), min(block_size, w)
    seeds_h, seeds_w = h - bh + 1, w - bw + 1
    gamma = prob * (h * w / (bh * bw * seeds_h * seeds_w))
    with torch.no_grad():
        # Uniforms in float32 whatever x's dtype: half precision would round small gammas.
        uniform = torch.rand(n, c, seeds_h, seeds_w, device=x.device)
        seeds = (uniform < gamma).to(x.dtype)
        # A seed at (i, j) marks the block whose top-left corner it is, so element (r, s) is masked
        # if a seed lies in rows r-b_h+1..r and columns s-b_w+1..s: a stride-1 max-pool over the seeds
        # zero-padded by b-1 on every side (odd and even block sizes alike, no cropping needed).
        padded = F.pad(seeds, (bw - 1, bw - 1, bh - 1, bh - 1))
        return F.max_pool2d(padded, kernel_size=(bh, bw), stride=1)


class Disout(nn.Module):
    """Disout: block-structured feature-map distortion (Tang et al. 2020, "Beyond Dropout: Feature Map
    Distortion to Regularize Deep Neural Networks", AAAI, arXiv:2002.11022).

    Dropout sets random elements of a feature map to zero; the paper argues that binary dropout is
    not optimal and *replaces* the selected elements with a distortion instead (their abstract:
    "randomly selected elements in the feature maps will be replaced with specific values"), in
    blocks as DropBlock does for conv features. In training mode, for x of shape
    (N, C, H, W):

        m   = block_mask(x, dist_prob, block_size)         1 on distorted elements (DropBlock's gamma)
        eps = alpha * sigma_c * z,   z ~ N(0, 1) per element, sigma_c = std of channel c over N, H, W
        y   = (x * (1 - m) + eps * m) / mean(1 - m)

    The distortion is zero-mean, and dividing by the kept fraction (as dropout and DropBlock do)
    keeps E[y] = E[x]. sigma_c is computed without gradient: the distortion is a constant to
    back-propagation, so distorted elements pass no gradient to x. Identity in eval mode and when
    `dist_prob` is 0.

    Source of the formula: the authors' released code (github.com/huawei-noah/Disout, `disout.py`;
    Huawei Vega's `FMDUnit` is the same code): the same blocks, mask-replace-rescale and Gaussian
    noise scaled by `alpha` and the feature map's standard deviation. Two differences keep the
    module self-contained: (1) sigma per channel instead of over the whole tensor; (2) no factor
    from the *next* convolution's weights, which their ResNets write into each Disout during
    training (a random-signed mean of that conv's largest weights), with 0.01 in its place when
    none is given. So `alpha` here is the noise std in units of the channel's std, i.e. their alpha
    times 0.01 on that fallback path. The masks are drawn per channel as in their code (timm's
    DropBlock2d shares one mask across channels by default).

    `dist_prob` can be set at any time, so a callback can ramp it from 0 during training as the
    authors' `LinearScheduler` does (`src.callbacks.disout_ramp.DisoutRamp`). It is kept in a
    tensor: torch.compile guards on Python numbers and would recompile the network for every value
    a ramp sets.

    Args:
        dist_prob: Fraction of each feature map to distort, in [0, 1).
        block_size: Side of the square blocks (clipped to the feature map); 1 distorts single elements.
        alpha: Distortion strength: the noise std in units of each channel's std (0: DropBlock with
            per-channel masks).
    """

    def __init__(self, dist_prob: float = 0.1, block_size: int = 6, alpha: float = 1.0):
        super().__init__()
        if block_size < 1:
            raise AutoclsError(f"Disout block_size={block_size} must be at least 1 (1 distorts single elements).")
        if alpha < 0:
            raise AutoclsError(f"Disout alpha={alpha} must be >= 0; it scales the distortion's std.")
        # Not persistent: state dicts stay those of the network without Disout.
        self.register_buffer("_dist_prob", torch.tensor(0.0), persistent=False)
        self.dist_prob = dist_prob
        self.block_size = int(block_size)
        self.alpha = float(alpha)

    @property
    def dist_prob(self) -> float:
        return float(self._dist_prob)

    @dist_prob.setter
    def dist_prob(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise AutoclsError(f"Disout dist_prob={value} must be in [0, 1); it is the fraction of a feature map to distort.")
        self._dist_prob.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No shortcut for dist_prob == 0 (reading the tensor would sync with the GPU): the mask is
        # then empty and the output equals x exactly.
        if not self.training:
            return x
        mask = block_mask(x, self._dist_prob, self.block_size)
        with torch.no_grad():
            keep = 1.0 - mask
            sigma = x.std(dim=(0, 2, 3), keepdim=True, correction=0)
            distortion = torch.randn_like(x).mul_(self.alpha * sigma).mul_(mask)
            keep_fraction = keep.mean()
            # If a (tiny) map were distorted everywhere, leave it unscaled rather than divide by 0.
            scale = torch.where(keep_fraction > 0, keep_fraction.reciprocal(), torch.ones_like(keep_fraction))
        return (x * keep + distortion) * scale

    def extra_repr(self) -> str:
        return f"dist_prob={self.dist_prob:.3f}, block_size={self.block_size}, alpha={self.alpha}"
