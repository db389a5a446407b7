"""The network of our CIFAR-10 speedrun (`experiment=cifar10_speedrun`), shaped after airbench94
(Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU"; our code, after reading the paper
and the airbench package).

What makes it fast to train:

* a frozen first layer that *whitens* 2x2 patches: its filters are the eigenvectors of the patch
  covariance of training images, scaled by 1/sqrt(eigenvalue), and their negatives (so the GELU after
  it keeps both signs); set by `init_whitening` (`callbacks.whitening` calls it before training).
  The network starts from decorrelated inputs instead of learning that first;
* few, wide layers: three blocks of conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU (64, 256,
  256 channels), global max-pooling and a bias-free linear head whose logits are scaled by 1/9;
* convolutions initialised as partial identities (Dirac on the first `in_channels` filters), so the
  untrained network passes its input through;
* BatchNorm with frozen scales (only the shifts learn), a fast running-statistics momentum (0.6 in
  airbench's convention, 0.4 in PyTorch's) and eps 1e-12.

The timm contract: `num_classes`, `num_features`, `forward_features` (the last feature map),
`forward_head(x, pre_logits=False)` (global max-pool, then the scaled linear head) and
`reset_classifier`.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn


def _conv(in_chans: int, out_chans: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_chans, out_chans, kernel_size=3, padding="same", bias=False)
    # the first in_chans filters start as the identity: the block first passes its input through
    nn.init.dirac_(conv.weight.data[:in_chans])
    return conv


def _batchnorm(channels: int, momentum: float, eps: float) -> nn.BatchNorm2d:
    # PyTorch's momentum is the weight of the new batch: 1 - (the decay of the running average)
    norm = nn.BatchNorm2d(channels, eps=eps, momentum=1 - momentum)
    norm.weight.requires_grad_(False)  # scales fixed at 1; only the shifts (biases) learn
    return norm


class ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, in_chans: int, out_chans: int, bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        self.conv1, self.pool = _conv(in_chans, out_chans), nn.MaxPool2d(2)
        self.norm1 = _batchnorm(out_chans, bn_momentum, bn_eps)
        self.conv2, self.norm2 = _conv(out_chans, out_chans), _batchnorm(out_chans, bn_momentum, bn_eps)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class SpeedrunNet(nn.Module):
    """See the module docstring.

    Args:
        num_classes: Outputs of the head; 0 makes it an identity (features only).
        in_chans: Input channels.
        widths: Channels of the three conv groups.
        whiten_kernel: Side of the whitened patches (the first layer has 2 x in_chans x k^2 filters).
        bn_momentum: Decay of BatchNorm's running statistics (airbench's convention).
        bn_eps: BatchNorm's epsilon.
        logit_scale: Factor on the head's output (a fixed temperature).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 256, 256),
        whiten_kernel: int = 2,
        bn_momentum: float = 0.6,
        bn_eps: float = 1e-12,
        logit_scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        whiten_width = 2 * in_chans * whiten_kernel**2
        self.whiten = nn.Conv2d(in_chans, whiten_width, whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data, never trained
        nn.init.zeros_(self.whiten.bias)
        self.act = nn.GELU()
        channels = [whiten_width, *widths]
        self.stages = nn.Sequential(*(ConvGroup(a, b, bn_momentum, bn_eps) for a, b in pairwise(channels)))
        self.num_features = channels[-1]
        self.logit_scale = logit_scale
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to whiten the patches of `images` ((N, C, H, W), normalised as the
        network's inputs): filter i is eigenvector v_i of the (uncentred) patch covariance divided by
        sqrt(lambda_i + eps), followed by the same filters negated; largest eigenvalue first."""
        c = images.shape[1]
        kh, kw = self.whiten.kernel_size
        patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1)  # (N, C, H', W', kh, kw)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        filters = eigenvectors.T.flip(0) / torch.sqrt(eigenvalues.flip(0) + eps)[:, None]
        filters = filters.reshape(-1, c, kh, kw)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.act(self.whiten(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.amax(dim=(2, 3))  # global max-pool (airbench: MaxPool2d(3) over the last 3x3 map)
        if pre_logits or self.num_classes == 0:
            return x
        return self.head(x) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()
