"""A ResNet of basic blocks built from a BackboneNAS encoding (`src.nas.backbone_space`).

`EncodedResNet("2x32-3x64s2-2x128s2")` is a 3x3 conv stem, then one stage per `<blocks>x<width>`
part (a stage marked `s2` halves the resolution in its first block), global average pooling and a
linear classifier: the CIFAR ResNet layout (`src.models.resnet_cifar`, whose `BasicBlock` it uses)
with the depth, widths and downsampling positions left to the search. timm's net contract, so a
searched backbone trains, distils and exports like any other network (`model/net=encoded_resnet`).
"""

from __future__ import annotations

from itertools import pairwise

from torch import nn

from src.models.resnet_cifar import BasicBlock, StagedNet
from src.nas.backbone_space import BackboneEncoding
from src.utils.errors import AutoclsError


class EncodedResNet(StagedNet):
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
