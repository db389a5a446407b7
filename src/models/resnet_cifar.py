"""ResNets for small (32x32) images.

Two families, both built by `CifarResNet`:

* He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2: ResNet-20/32/44/56/110
  (depth 6n+2). A 3x3 stem with 16 channels, three stages of n basic blocks with 16/32/64 channels,
  and parameter-free "option A" shortcuts. These are the paper's CIFAR-10 models (0.27M params
  for ResNet-20, 0.85M for ResNet-56).
* ResNet-18 as commonly trained on CIFAR (the kuangliu/pytorch-cifar variant): the ImageNet
  ResNet-18 stages (64/128/256/512 channels, two blocks each) behind a 3x3 stride-1 stem without
  max-pool, so 32x32 inputs are not downsampled 4x before the first block; 1x1 conv + BN
  projection shortcuts ("option B"). About 11.17M params for 10 classes.

Optional regularisers, all off by default (and then without effect: same parameters, same outputs):
drop path / stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth") on every
block's residual branch, with timm's linear rule over the blocks; DropBlock (Ghiasi et al. 2018) and
Disout (Tang et al. 2020, `src.models.regularizers`) after each conv-BN of the residual branch in
the last two stages, where the DropBlock paper applies it (groups 3 and 4 of ResNet-50).

Configs use `resnet_cifar(depth=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from src.models.classifier_contract import TimmClassifier
from src.models.regularizers import Disout
from src.utils.errors import AutoclsError

Shortcut = Literal["A", "B"]

HE_DEPTHS = (20, 32, 44, 56, 110)
SUPPORTED_DEPTHS = (18, *HE_DEPTHS)


def _conv3x3(in_chans: int, out_chans: int, stride: int = 1) -> nn.Conv2d:
    # bias=False: every conv is followed by BatchNorm, whose shift makes a conv bias redundant.
    return nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and append zero channels.

    He et al. use it on CIFAR so that the residual nets have exactly the parameters of their plain
    counterparts (the point of their comparison); it also keeps ResNet-20 at 0.27M parameters,
    where 1x1 projections would add noticeably to a network this small.
    """

    def __init__(self, stride: int, extra_chans: int):
        super().__init__()
        self.stride = stride
        self.extra_chans = extra_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Taking every stride-th pixel yields ceil(H / stride) rows, the same size as the
        # residual branch's stride-s, padding-1 conv, for odd sizes as well.
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads from the last dimension backwards: (W, W, H, H, C_before, C_after).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_chans))


def _projection_shortcut(in_chans: int, out_chans: int, stride: int) -> nn.Sequential:
    """Option-B shortcut: a strided 1x1 conv + BN, as in ImageNet ResNets and kuangliu's ResNet-18."""
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_chans),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut; ReLU after the addition (the original, post-activation
    form used in both papers).

    `feature_drop` makes the regulariser applied after each conv-BN (DropBlock, Disout, both, or
    nn.Identity): after every conv as in the DropBlock paper and after both convs as in Tang et al.'s
    ResNets (timm's BasicBlock has DropBlock after the first only). `drop_path_rate` is the
    probability of dropping the whole residual branch of a sample. Both are parameter-free, so the
    state dict is the same with or without them.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        stride: int = 1,
        shortcut: Shortcut = "A",
        feature_drop: Callable[[], nn.Module] = nn.Identity,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.conv1 = _conv3x3(in_chans, out_chans, stride)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = _conv3x3(out_chans, out_chans)
        self.bn2 = nn.BatchNorm2d(out_chans)
        if stride == 1 and in_chans == out_chans:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(stride, out_chans - in_chans)
        else:
            self.shortcut = _projection_shortcut(in_chans, out_chans, stride)
        self.drop1 = feature_drop()
        self.drop2 = feature_drop()
        if drop_path_rate > 0:
            # Imported only when used: importing timm takes seconds.
            from timm.layers import DropPath

            self.drop_path: nn.Module = DropPath(drop_path_rate)
        else:
            self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.drop1(self.bn1(self.conv1(x))), inplace=True)
        # Drop path scales the branch per sample (0 or 1/keep); the shortcut always passes.
        out = self.drop_path(self.drop2(self.bn2(self.conv2(out))))
        return F.relu(out + self.shortcut(x), inplace=True)


def _feature_drop(
    drop_block_rate: float, drop_block_size: int, disout_prob: float, disout_block_size: int, disout_alpha: float
) -> nn.Module:
    """The regulariser for one conv-BN output: DropBlock, then Disout, whichever are on."""
    layers: list[nn.Module] = []
    if drop_block_rate > 0:
        from timm.layers import DropBlock2d  # see BasicBlock: imported only when used

        # timm's defaults: one mask shared by all channels, kept elements rescaled by 1 / kept fraction.
        layers.append(DropBlock2d(drop_prob=drop_block_rate, block_size=drop_block_size))
    if disout_prob > 0:
        layers.append(Disout(disout_prob, disout_block_size, disout_alpha))
    if not layers:
        return nn.Identity()
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise AutoclsError(f"model.net.{name}={value} must be in [0, 1); use 0 to switch it off.")


class StagedNet(TimmClassifier):
    """timm's classifier contract (`TimmClassifier`) for a network built as `stem` -> `stages` (an
    nn.Sequential of stages, each an nn.Sequential of blocks) -> `global_pool` -> `head_drop` -> `fc`.
    Subclasses build those modules and set `num_features` and `num_classes`; `fc` comes from
    `_make_classifier`."""

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter grouping (stages for `optimizer.lr_mult_list`, layers for
        `optimizer.layer_decay`): the stem, then each stage (coarse) or each block (fine); the
        unmatched classifier forms the last group."""
        return {"stem": r"^stem\.", "blocks": r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map before pooling, (B, num_features, h, w)."""
        return self.stages(self.stem(x))


class CifarResNet(StagedNet):
    """A ResNet of basic blocks without the ImageNet stem's 7x7 conv and max-pool.

    Args:
        blocks_per_stage: Number of blocks in each stage.
        widths: Channels of each stage; the stem uses the first.
        shortcut: "A" (zero-padding, parameter-free) or "B" (1x1 projection) where shapes change.
        num_classes: Number of output classes; 0 makes the head an identity (features only).
        in_chans: Number of input channels.
        drop_rate: Dropout probability before the classifier (0 in both papers).
        drop_path_rate: Stochastic depth: the drop probability of the last block's residual branch;
            it rises linearly from 0 at the first block (timm's rule), 0 switches it off.
        drop_block_rate: DropBlock's drop probability after each conv-BN of the residual branch in
            the last two stages (0: off).
        drop_block_size: DropBlock's block side (clipped to the feature map).
        disout_prob: Disout's distorted fraction after each conv-BN of the residual branch in the last
            two stages (0: off); `DisoutRamp` can raise it from 0 during training.
        disout_block_size: Disout's block side (clipped to the feature map).
        disout_alpha: Disout's distortion std in units of each channel's std.
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        shortcut: Shortcut = "A",
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_block_rate: float = 0.0,
        drop_block_size: int = 5,
        disout_prob: float = 0.0,
        disout_block_size: int = 6,
        disout_alpha: float = 1.0,
    ):
        super().__init__()
        if len(blocks_per_stage) != len(widths) or min(widths, default=0) < 1 or min(blocks_per_stage, default=0) < 1:
            raise AutoclsError(
                f"model.net.blocks_per_stage={list(blocks_per_stage)} and model.net.widths={list(widths)} need one "
                "positive entry per stage each."
            )
        rates = {"drop_path_rate": drop_path_rate, "drop_block_rate": drop_block_rate, "disout_prob": disout_prob}
        for name, rate in rates.items():
            _check_rate(name, rate)
        self.num_classes = num_classes
        self.num_features = widths[-1]

        self.stem = nn.Sequential(
            _conv3x3(in_chans, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        # DropBlock and Disout in the last two stages only, as the DropBlock paper (groups 3 and 4 of
        # ResNet-50) and timm's ResNet apply DropBlock; the early, high-resolution maps are left alone.
        feature_drop = partial(
            _feature_drop, drop_block_rate, drop_block_size, disout_prob, disout_block_size, disout_alpha
        )
        last_block = max(sum(blocks_per_stage) - 1, 1)
        stages = []
        in_width = widths[0]
        block_number = 0
        for index, (num_blocks, width) in enumerate(zip(blocks_per_stage, widths)):
            # Every stage but the first halves the resolution in its first block.
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(BasicBlock(
                    in_width, width, stride if block_index == 0 else 1, shortcut,
                    feature_drop=feature_drop if index >= len(widths) - 2 else nn.Identity,
                    # Huang et al.'s linear decay rule, from 0 at the first block as timm has it:
                    # early blocks extract the low-level features every later block uses.
                    drop_path_rate=drop_path_rate * block_number / last_block,
                ))
                in_width = width
                block_number += 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = self._make_classifier(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init (the paper's choice): keeps activation variance stable through ReLUs.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def resnet_cifar(depth: int = 20, num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """Build a CIFAR ResNet by depth: 20/32/44/56/110 (He et al. 2016) or 18 (kuangliu's ResNet-18).

    Extra keyword arguments (e.g. `drop_rate`, `drop_path_rate`, `drop_block_rate`, `disout_prob`) go
    to `CifarResNet`.
    """
    if depth == 18:
        return CifarResNet(
            [2, 2, 2, 2], [64, 128, 256, 512], shortcut="B",
            num_classes=num_classes, in_chans=in_chans, **kwargs,
        )
    if depth in HE_DEPTHS:
        # depth = 6n + 2: the stem conv, 3 stages x n blocks x 2 convs, and the classifier.
        n = (depth - 2) // 6
        return CifarResNet(
            [n, n, n], [16, 32, 64], shortcut="A",
            num_classes=num_classes, in_chans=in_chans, **kwargs,
        )
    supported = ", ".join(str(d) for d in SUPPORTED_DEPTHS)
    raise AutoclsError(f"Unsupported CIFAR ResNet depth {depth}; choose one of {supported}.")
