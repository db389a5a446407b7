"""Batches as index slices of tensors that already live on the training device.

Small datasets (digits, CIFAR, small image folders) fit in accelerator memory as one uint8 tensor.
Moving them there once and slicing batches out of them removes worker processes, host-to-device
copies and collation from every step, which is what makes short AutoML trials fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from src.datamodules.sampling import epoch_indices, epoch_size


class DeviceBatches:
    """An iterable of `(images, labels)` batches sliced from device-resident tensors.

    The order of an epoch depends only on `(seed, epoch)`, so a resumed run sees the same batches as an
    uninterrupted one. `progress_fn()` returns `(epoch, batches_already_done)` when an iteration
    starts; after a mid-epoch resume the second number skips the batches the interrupted epoch trained
    on (Lightning's loop progress knows it exactly; a count kept here would be off by the batch that
    Lightning prefetches). Under data parallelism each rank takes every `world_size`-th sample of the
    shared permutation. With `shuffle`, `sampling` (`data.sampler`: null, `oversample`, `undersample`)
    re-balances the classes; see `src.datamodules.sampling`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        progress_fn: Callable[[], tuple[int, int]] = lambda: (0, 0),
        rank: int = 0,
        world_size: int = 1,
        sampling: str | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.progress_fn = seed, progress_fn
        self.rank, self.world_size = rank, world_size
        # not named `sampler`: Lightning takes anything with a `sampler` attribute for a DataLoader
        self.sampling = sampling if shuffle else None  # an evaluation pass visits every sample once
        self._epoch_size = epoch_size(labels, self.sampling)  # fixed: the labels never change

    def _num_samples(self) -> int:
        # every rank gets the same count, so collective ops stay in step
        n = self._epoch_size
        return n // self.world_size if self.world_size > 1 else n

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _indices(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            order = epoch_indices(self.labels, self.sampling, self.seed, epoch)
        else:
            order = torch.arange(len(self.labels))
        if self.world_size > 1:
            order = order[self.rank :: self.world_size][: self._num_samples()]
        return order.to(self.labels.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, done = self.progress_fn()
        order = self._indices(epoch)
        for b in range(done, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx]
