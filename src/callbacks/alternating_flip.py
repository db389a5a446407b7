"""Alternating horizontal flips of the training images (airbench's derandomised flip; Jordan 2024).

A random flip per image and epoch shows some images unflipped several epochs in a row. Flipping every
image in every other epoch instead, starting flipped or not at random, shows each image both ways
within any two consecutive epochs, which airbench found reaches the same accuracy in fewer epochs.

Image i is mirrored in epoch e iff `r_i xor (e is odd)`, with `r_i` ~ Bernoulli(0.5) drawn once from
`seed`. The callback flips the in-memory training images in place at the start of each epoch (only
those whose state changes) and flips them back when training ends, so nothing has to know an image's
index. Use it instead of the random flip op: `augmentation.ops.hflip=null`.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from src.datamodules.base import TensorSplit
from src.utils.errors import AutoclsError


class AlternatingFlip(pl.Callback):
    """See the module docstring. Nothing needs saving: a resumed run reloads unflipped images and the
    epoch number gives their state."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._flipped: torch.Tensor | None = None  # which training images are mirrored now

    @staticmethod
    def _images(trainer: pl.Trainer) -> torch.Tensor:
        split = getattr(getattr(trainer, "datamodule", None), "splits", {}).get("train")
        if not isinstance(split, TensorSplit):
            raise AutoclsError(
                "callbacks.alternating_flip flips in-memory training images; use data.in_memory=true "
                "or the random flip op (augmentation.ops.hflip) instead."
            )
        return split.images

    def mirrored_in(self, epoch: int, n: int) -> torch.Tensor:
        """(n,) bool: which images epoch `epoch` shows mirrored."""
        start = torch.rand(n, generator=torch.Generator().manual_seed(self.seed)) < 0.5
        return start ^ bool(epoch % 2)

    def _set(self, images: torch.Tensor, target: torch.Tensor) -> None:
        current = self._flipped if self._flipped is not None else torch.zeros_like(target)
        change = (current ^ target).nonzero().squeeze(1).to(images.device)
        if len(change):
            images[change] = images[change].flip(-1)
        self._flipped = target

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        images = self._images(trainer)
        self._set(images, self.mirrored_in(trainer.current_epoch, len(images)))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore(trainer)

    def _restore(self, trainer: pl.Trainer) -> None:
        if self._flipped is not None:
            self._set(self._images(trainer), torch.zeros_like(self._flipped))
            self._flipped = None
