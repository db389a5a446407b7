"""Labelled, preprocessed images from a data module, for calibration and for accuracy checks of
exported, quantised and pruned models outside Lightning's loops."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from src.datamodules.base import ClassificationDataModule, FileSplit
from src.utils.errors import AutoclsError


def datamodule_for(data_config: dict) -> ClassificationDataModule:
    """The data module a checkpoint's run used (no augmentation), set up."""
    from src.utils.instantiate import build_datamodule

    datamodule = build_datamodule(OmegaConf.create({"data": data_config, "augmentation": None}))
    datamodule.setup("fit")
    return datamodule


def split_images(
    datamodule: ClassificationDataModule, split: str = "test", count: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a split as the network sees them at evaluation: float, normalised,
    N x C x H x W on the CPU. `count` draws that many at random (seeded) instead of all."""
    datamodule.setup("fit")
    data = datamodule.splits[split]
    indices = np.arange(len(data))
    if count is not None and count < len(data):
        indices = np.sort(np.random.default_rng(seed).choice(len(data), size=count, replace=False))
    if isinstance(data, FileSplit):
        from src.datamodules.image_files import decode_to_tensor

        samples = [data.samples[i] for i in indices]
        crop_pct = 1.0 if split == "train" else datamodule.crop_pct
        images, labels, _ = decode_to_tensor(samples, datamodule.image_size, crop_pct)
    else:
        index = torch.as_tensor(indices)
        images, labels = data.images[index.to(data.images.device)].cpu(), data.labels[index.to(data.labels.device)].cpu()
    images = datamodule.normalize(images.float().div_(255))
    return images, labels


def calibration_images(datamodule: ClassificationDataModule, count: int = 256, seed: int = 0) -> torch.Tensor:
    """`count` training images drawn at random, preprocessed like evaluation images (INT8 ranges must
    match what the deployed model sees, not augmented training views)."""
    if count < 1:
        raise AutoclsError(f"calibration count={count} must be at least 1; a few hundred images are typical.")
    return split_images(datamodule, "train", count, seed)[0]


def top1_accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor | np.ndarray],
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
) -> float:
    """Fraction of `images` whose highest logit from `predict(batch)` is the label."""
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = predict(images[start : start + batch_size])
            logits = torch.as_tensor(np.asarray(logits)) if not isinstance(logits, torch.Tensor) else logits
            correct += int((logits.argmax(dim=1).cpu() == labels[start : start + batch_size]).sum())
    return correct / max(1, len(images))
