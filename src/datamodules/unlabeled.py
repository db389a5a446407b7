"""Unlabeled images mixed into every training batch, for distillation (PaddleClas SSLD).

A teacher can supervise images nobody labelled: SSLD adds millions of such images to ImageNet's
training set. `UnlabeledImages` (`data.unlabeled`, configs in `configs/data/unlabeled/`) names
them and how many go into each batch:

* `data_dir`: a folder of images at any depth (class folders are fine; their names are ignored),
  or null for the data module's own training images with their labels dropped;
* `ratio`: unlabeled images per labelled one. Every training batch holds `data.batch_size`
  labelled images followed by `round(ratio * batch_size)` unlabeled ones, so an epoch is still one
  pass over the labelled split and the schedule's step counts do not change;
* `max_images`: a seeded random subset of the folder, e.g. for short runs.

Unlabeled samples carry the label `UNLABELED` (-1). Only modules that say they learn from them
(`learns_from_unlabeled`, i.e. `DistillationLitModule`) accept such batches; they keep -1 out of
the hard-label loss and the accuracy metrics. Batch mixing (Mixup/CutMix) is refused with
unlabeled data: it would blend unlabeled images into labelled targets.

How batches are built: for in-memory (device-resident) training data the pool is decoded once at
`image_size` and lives on the device too, and `UnlabeledBatches` slices it like `DeviceBatches`;
for streamed data a second DataLoader decodes the pool's files with the training transform. Either
way a Lightning `CombinedLoader` yields `{"labelled": batch, "unlabeled": batch}` pairs and
`ClassificationDataModule.on_after_batch_transfer` joins them (`join_parts`) before augmenting,
so both parts get the same per-sample augmentation. The unlabeled order depends only on
`(seed, epoch)`, and data-parallel ranks draw disjoint shares of it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from src.datamodules.image_files import (
    ImageFileDataset,
    SkippedFile,
    collate_skip_none,
    decode_to_tensor,
    is_image_file,
)
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

UNLABELED = -1
"""The label of an unlabeled sample."""


class UnlabeledImages:
    """Where unlabeled training images come from and how many join each batch; see the module
    docstring. Nothing is read until the training loader is built, so evaluation never needs the
    folder."""

    def __init__(self, data_dir: str | None = None, ratio: float = 1.0, max_images: int | None = None, seed: int = 0) -> None:
        if not ratio > 0:
            raise AutoclsError(
                f"data.unlabeled.ratio={ratio} must be > 0 (unlabeled images per labelled one); remove data.unlabeled to train without them."
            )
        if max_images is not None and max_images < 1:
            raise AutoclsError(f"data.unlabeled.max_images={max_images} must be a positive number of images, or null for all.")
        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.ratio, self.max_images, self.seed = float(ratio), max_images, seed

    @property
    def from_train_split(self) -> bool:
        return self.data_dir is None

    def per_batch(self, batch_size: int) -> int:
        return max(1, round(self.ratio * batch_size))

    def describe(self) -> str:
        source = "the train split, labels dropped" if self.from_train_split else str(self.data_dir)
        return f"{source}, {self.ratio:g} per labelled image"

    def image_files(self) -> tuple[list[str], list[str]]:
        """(image paths, non-image paths) below `data_dir`, sorted; a seeded subset of
        `max_images` when set."""
        root = self.data_dir
        if not root.is_dir():
            raise AutoclsError(f"data.unlabeled.data_dir={root} is not a folder; point it at a folder of images (any depth).")
        images, others = [], []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                (images if is_image_file(name) else others).append(path)
        if not images:
            raise AutoclsError(f"data.unlabeled.data_dir={root} holds no image files; add images to it or remove data.unlabeled.")
        if self.max_images is not None and self.max_images < len(images):
            gen = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(len(images), generator=gen)[: self.max_images].sort().values
            images = [images[i] for i in keep.tolist()]
        return images, others


def pool_order(pool_size: int, count: int, seed: int, epoch: int) -> torch.Tensor:
    """`count` indices into the pool for one epoch: whole seeded permutations back to back, so
    every image is used before any repeats (CPU int64, deterministic in `(seed, epoch)`)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * epoch + 1)
    rounds = -(-count // pool_size)
    return torch.cat([torch.randperm(pool_size, generator=gen) for _ in range(rounds)])[:count]


class UnlabeledBatches:
    """`num_batches` batches of `per_batch` device-resident images with label -1 (the in-memory
    counterpart of the labelled `DeviceBatches`, which it follows batch for batch: the same
    `progress_fn` skips the batches of an interrupted epoch on resume)."""

    def __init__(
        self,
        images: torch.Tensor,
        per_batch: int,
        num_batches: int,
        seed: int = 0,
        progress_fn: Callable[[], tuple[int, int]] = lambda: (0, 0),
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.per_batch, self.num_batches = images, per_batch, num_batches
        self.seed, self.progress_fn, self.rank, self.world_size = seed, progress_fn, rank, world_size
        self._labels = torch.full((per_batch,), UNLABELED, dtype=torch.long, device=images.device)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, done = self.progress_fn()
        n = self.per_batch
        order = pool_order(len(self.images), n * self.num_batches * self.world_size, self.seed, epoch)
        order = order[self.rank :: self.world_size].to(self.images.device)
        for b in range(done, self.num_batches):
            yield self.images[order[b * n : (b + 1) * n]], self._labels


class UnlabeledSampler(Sampler[int]):
    """`num_samples` pool indices per epoch for the streamed unlabeled DataLoader (`pool_order`).
    A sampler of its own type, so Lightning wraps rather than replaces it under data parallelism."""

    def __init__(self, pool_size: int, num_samples: int, seed: int = 0) -> None:
        self.pool_size, self.num_samples, self.seed = pool_size, num_samples, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(pool_order(self.pool_size, self.num_samples, self.seed, self.epoch).tolist())


def load_pool(unlabeled: UnlabeledImages, train_split, image_size: int, in_chans: int, decode_threads: int = 0):
    """The pool as a split of the train split's kind: `TensorSplit` (decoded at `image_size`, like
    in-memory training images) or `FileSplit`; labels are all -1. Also returns the non-image files
    found, for the run's skipped-files list."""
    from src.datamodules.base import FileSplit, TensorSplit  # base imports this module

    if unlabeled.from_train_split:
        if isinstance(train_split, TensorSplit):
            return TensorSplit(train_split.images, torch.full_like(train_split.labels, UNLABELED)), []
        return FileSplit([(path, UNLABELED) for path, _ in train_split.samples]), []
    paths, others = unlabeled.image_files()
    skipped = [SkippedFile(p, "not an image file") for p in others]
    samples = [(p, UNLABELED) for p in paths]
    if isinstance(train_split, FileSplit):
        return FileSplit(samples), skipped
    if in_chans != 3:
        raise AutoclsError(
            f"data.unlabeled.data_dir holds RGB images but the data has in_chans={in_chans}; use images like the "
            f"training data's, or data.unlabeled.data_dir=null for the train split's own images."
        )
    images, labels, unreadable = decode_to_tensor(samples, image_size, 1.0, decode_threads)
    return TensorSplit(images, labels), skipped + unreadable


def with_unlabeled(datamodule, labelled):
    """The training loader of `datamodule` (`labelled`, already built) combined with its unlabeled
    pool: a `CombinedLoader` whose batches `join_parts` concatenates."""
    from pytorch_lightning.utilities import CombinedLoader

    from src.datamodules.base import TensorSplit

    trainer = datamodule.trainer
    module = trainer.lightning_module if trainer is not None else None
    if module is not None and not getattr(module, "learns_from_unlabeled", False):
        raise AutoclsError(
            f"data.unlabeled adds images without labels, which only a teacher can supervise; train with "
            f"model=distillation or remove data.unlabeled ({type(module).__name__} needs a label for every image)."
        )
    unlabeled: UnlabeledImages = datamodule.unlabeled
    per_batch = unlabeled.per_batch(datamodule.batch_size)
    num_batches = len(labelled)
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if isinstance(datamodule.splits["train"], TensorSplit):
        # the train-images source reuses the resident training tensor: no second copy on the device
        images = (datamodule.splits["train"] if unlabeled.from_train_split else datamodule.unlabeled_pool(
            trainer.strategy.root_device if trainer is not None else None)).images
        part = UnlabeledBatches(images, per_batch, num_batches, seed=datamodule.seed, progress_fn=datamodule._train_progress,
                                rank=rank, world_size=world)
    else:
        part = _file_loader(datamodule, datamodule.unlabeled_pool().samples, per_batch, num_batches)
    return CombinedLoader({"labelled": labelled, "unlabeled": part}, mode="min_size")


def _file_loader(datamodule, samples: list[tuple[str, int]], per_batch: int, num_batches: int) -> DataLoader:
    trainer = datamodule.trainer
    workers = datamodule.num_workers
    return DataLoader(
        ImageFileDataset(samples, transform=datamodule.augmentation.sample_transform(datamodule.image_size)),
        batch_size=per_batch,
        sampler=UnlabeledSampler(len(samples), per_batch * num_batches, seed=datamodule.seed),
        drop_last=True,
        num_workers=workers,
        pin_memory=datamodule.pin_memory and trainer is not None and trainer.strategy.root_device.type == "cuda",
        persistent_workers=workers > 0,
        collate_fn=collate_skip_none,
    )


def join_parts(batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`{"labelled": (x, y), "unlabeled": (x_u, y_u)}` -> one batch, labelled images first. A part
    may be None when all of its streamed files were unreadable."""
    parts = [p for p in (batch.get("labelled"), batch.get("unlabeled")) if p is not None]
    if not parts:
        return None
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1].to(images.device) for p in parts])
    return images, labels
