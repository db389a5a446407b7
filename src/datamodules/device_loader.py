"""Batches as index slices of tensors that already live on the training device.

Small datasets (digits, CIFAR, small image folders) fit in accelerator memory as one uint8 tensor.
Moving them there once and slicing batches out of them removes worker processes, host-to-device
copies and collation from every step, which is what makes short AutoML trials fast.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch


class DeviceBatches:
    """An iterable of `(images, labels)` batches sliced from device-resident tensors.

    The order of an epoch depends only on `(seed, epoch)`, so a resumed run sees the same batches as an
    uninterrupted one. `progress_fn()` returns `(epoch, batches_already_done)` when an iteration
    starts; after a mid-epoch resume the second number skips the batches the interrupted epoch trained
    on (Lightning's loop progress knows it exactly; a count kept here would be off by the batch that
    Lightning prefetches). Under data parallelism each rank takes every `world_size`-th sample of the
    shared permutation.
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
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.progress_fn = seed, progress_fn
        self.rank, self.world_size = rank, world_size

    def _num_samples(self) -> int:
        # every rank gets the same count, so collective ops stay in step
        return len(self.labels) // self.world_size if self.world_size > 1 else len(self.labels)

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _indices(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            order = order[self.rank :: self.world_size][: self._num_samples()]
        return order.to(self.labels.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, done = self.progress_fn()
        order = self._indices(epoch)
        for b in range(done, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx]
