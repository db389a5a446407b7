"""scikit-learn's bundled 8x8 handwritten digits: 1,797 grayscale images, 10 classes, no download."""

from __future__ import annotations

import torch

from src.datamodules.base import (
    ClassificationDataModule,
    TensorSplit,
    train_val_test_split,
)


class DigitsDataModule(ClassificationDataModule):
    """Fixed stratified train/val/test split of `sklearn.datasets.load_digits` (seeded, so every run and
    machine sees the same split). Pixel values 0..16 are rescaled to 0..255 uint8 images."""

    def __init__(
        self, val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0, **kwargs
    ) -> None:
        kwargs.setdefault("in_chans", 1)
        kwargs.setdefault("image_size", 8)
        kwargs.setdefault("mean", (0.3059,))
        kwargs.setdefault("std", (0.3761,))
        super().__init__(**kwargs)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed

    def _detect_num_classes(self) -> int:
        return 10

    def _load_splits(self) -> dict[str, TensorSplit]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
        labels = torch.from_numpy(digits.target).long()
        self.class_names = [str(i) for i in range(10)]
        train, val, test = train_val_test_split(labels, self.val_fraction, self.test_fraction, self.split_seed)
        return {name: TensorSplit(images[idx], labels[idx]) for name, idx in
                (("train", train), ("val", val), ("test", test))}
