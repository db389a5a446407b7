"""The training augmentation a config describes: ordered named ops (a crop first), applied on the
device to in-memory batches or per sample on CPU to streamed images, and optional batch mixing
(Mixup/CutMix) of every normalised training batch on the device."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchvision.transforms import v2

from src.augment.mixing import BatchMixing
from src.augment.ops import Views
from src.utils.errors import AutoclsError


class Augmentation(nn.Module):
    """Training-time augmentation.

    `ops` maps a name to an op (see `src.augment.ops`); names let configs combine and remove ops
    (`augmentation.ops.hflip=null`), and the mapping's order is the order of application. Evaluation
    never augments; normalisation is the data module's last step, after these ops. `mixing` (see
    `src.augment.mixing`) then mixes the normalised batch and its labels (`mix`).
    """

    def __init__(self, ops: Mapping[str, nn.Module | None] | None = None, mixing: BatchMixing | None = None) -> None:
        super().__init__()
        self.ops = nn.ModuleDict({name: op for name, op in (ops or {}).items() if op is not None})
        self.mixing = mixing
        if mixing is not None and any(getattr(op, "views", 1) > 1 for op in self.ops.values()):
            raise AutoclsError(
                "AugMix jsd=true returns three views per image, which batch mixing cannot pair with labels; "
                "set augmentation.ops.augmix.jsd=false or augmentation.mixing=null."
            )
        crops = [name for name, op in self.ops.items() if getattr(op, "is_crop", False)]
        if len(crops) > 1 or (crops and next(iter(self.ops)) != crops[0]):
            raise AutoclsError(
                f"augmentation ops {list(self.ops)} must start with at most one crop (found {crops}); "
                "remove the extra crop with augmentation.ops.<name>=null."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops.values():
            x = op(x)
        return x

    def mix(
        self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch mixing of a normalised training batch: integer labels become (B, num_classes)
        probability targets; without `mixing` both come back unchanged."""
        if self.mixing is None:
            return images, labels
        return self.mixing(images, labels, num_classes)

    def sample_transform(self, image_size: int) -> v2.Transform:
        """Per-sample CPU transform (PIL in, uint8 CHW tensor out) for streamed training data; with a
        multi-view op (AugMix jsd=true) the views of each image stacked, (V, C, H, W)."""
        steps = [op.sample_transform(image_size) for op in self.ops.values()]
        if not any(getattr(op, "is_crop", False) for op in self.ops.values()):
            # without a crop op the images still need one fixed size to be batched
            steps.insert(0, v2.Compose([v2.Resize(image_size), v2.CenterCrop(image_size)]))
        steps.append(v2.PILToTensor())
        for i, step in enumerate(steps):
            if isinstance(step, Views):  # the steps after it run on every view: (V, C, H, W) per image
                return v2.Compose([*steps[:i], Views(step.branches, after=v2.Compose(steps[i + 1 :]))])
        return v2.Compose(steps)
