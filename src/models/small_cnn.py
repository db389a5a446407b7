"""A small conv net for tiny images (scikit-learn's 8x8 digits, also 28x28 / 32x32 inputs).

It is the network of the default run, which must train in seconds on a laptop CPU, so it stays
around 100k parameters and avoids anything that only pays off on large images.
"""

from __future__ import annotations

import torch
from torch import nn

from src.models.classifier_contract import TimmClassifier
from src.utils.errors import AutoclsError


def _conv_bn_relu(in_chans: int, out_chans: int) -> nn.Sequential:
    # bias=False: the following BatchNorm has its own shift, a conv bias would be redundant.
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


class SmallCNN(TimmClassifier):
    """Three conv-BN-ReLU blocks (width, 2*width, 4*width) with one 2x2 max-pool, then global
    average pooling, dropout and a linear classifier.

    A single pool keeps a 4x4 map for 8x8 inputs (pooling twice would leave 2x2, too coarse for
    the last 3x3 conv); global average pooling makes the net accept any input size >= 2x2.

    Args:
        num_classes: Number of output classes; 0 makes the head an identity (features only).
        in_chans: Number of input channels.
        width: Channels of the first block; the others use 2x and 4x.
        dropout: Dropout probability before the classifier.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32, dropout: float = 0.1):
        super().__init__()
        if width < 1 or not 0 <= dropout < 1:
            raise AutoclsError(
                f"model.net.width={width} must be a positive number of channels and model.net.dropout={dropout} a "
                "probability in [0, 1) (defaults: 32 and 0.1)."
            )
        self.num_classes = num_classes
        self.num_features = 4 * width
        self.features = nn.Sequential(
            _conv_bn_relu(in_chans, width),
            _conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 4 * width),
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(dropout)
        self.fc = self._make_classifier(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init suits the ReLU that follows every conv.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter grouping (stages for `optimizer.lr_mult_list`, layers for
        `optimizer.layer_decay`): the first block is the stem, each later block a stage (coarse and
        fine are the same here); the unmatched classifier forms the last group."""
        return {"stem": r"^features\.0\.", "blocks": r"^features\.(\d+)\."}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling, shape (B, num_features, H', W')."""
        return self.features(x)
