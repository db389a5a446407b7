"""A ResNet of basic blocks built from a BackboneNAS encoding (`src.nas.backbone_space`).

`EncodedResNet("2x32-3x64s2-2x128s2")` is a 3x3 conv stem, then one stage per `<blocks>x<width>`
part (a stage marked `s2` halves the resolution in its first block), global average pooling and a
linear classifier: the CIFAR ResNet layout (`src.models.resnet_cifar`, whose `BasicBlock` it uses)
with the depth, widths and downsampling positions left to the search. timm's net contract, so a
searched backbone trains, distils and exports like any other network (`model/net=encoded_resnet`).
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from src.models.resnet_cifar import BasicBlock
from src.nas.backbone_space import BackboneEncoding
from src.utils.errors import AutoclsError


class EncodedResNet(nn.Module):
    """See the module docstring.

    Args:
        encoding: The stages, as a string ("2x32-3x64s2-2x128s2") or a `BackboneEncoding`.
        num_classes: Output classes; 0 makes the head an identity (features only).
        in_chans: Input channels.
        stem_width: Channels of the stem conv.
        shortcut: "B": 1x1 conv + BN projection where a block changes shape (any widths); "A":
            parameter-free subsample-and-pad (He et al.'s CIFAR option; widths must not shrink).
        drop_rate: Dropout before the classifier.
    """

    def __init__(
        self,
        encoding: str | BackboneEncoding,
        num_classes: int = 10,
        in_chans: int = 3,
        stem_width: int = 16,
        shortcut: str = "B",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.encoding = BackboneEncoding.parse(encoding)
        if shortcut == "A":
            widths = [stem_width] + [s.width for s in self.encoding.stages]
            if any(b < a for a, b in pairwise(widths)):
                raise AutoclsError(f"shortcut=A cannot shrink widths ({self.encoding}); use shortcut=B.")
        self.num_classes = num_classes
        self.num_features = self.encoding.stages[-1].width
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
        )
        stages, width = [], stem_width
        for stage in self.encoding.stages:
            blocks = []
            for b in range(stage.blocks):
                stride = 2 if stage.downsample and b == 0 else 1
                blocks.append(BasicBlock(width, stage.width, stride, shortcut))
                width = stage.width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = self._make_classifier(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's grouping: the stem, then each stage (coarse) or block (fine); the head last."""
        return {"stem": r"^stem\.", "blocks": r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = self._make_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
