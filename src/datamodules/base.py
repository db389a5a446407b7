"""What every classification data module shares.

A subclass only says where its images come from (`_load_splits`) and how many classes there are
(`_detect_num_classes`). This base turns the splits into loaders:

* `TensorSplit` (uint8 images in memory) -> moved to the training device once, batches are index
  slices (`DeviceBatches`), augmentation runs on the device in `on_after_batch_transfer`;
* `FileSplit` (paths) -> a DataLoader with workers decodes and augments per sample on CPU.

Either way a batch reaches the model as normalised float images, and `num_classes`, `class_names`,
`image_size`, `in_chans`, `mean` and `std` describe the data to configs and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from src.augment.pipeline import Augmentation
from src.datamodules.device_loader import DeviceBatches
from src.datamodules.sampling import (
    ClassBalancedSampler,
    check_sampler,
    epoch_size,
    split_labels,
)
from src.datamodules.unlabeled import (
    UnlabeledImages,
    join_parts,
    load_pool,
    with_unlabeled,
)
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# With `search_split` (DARTS-style search), the train split is also held as two disjoint halves: one
# trains the network weights, the other the architecture parameters.
SEARCH_HALVES = ("search_weights", "search_arch")


@dataclass
class TensorSplit:
    """A split held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FileSplit:
    """A split streamed from disk: (path, label) pairs decoded by DataLoader workers."""

    samples: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.samples)


class ClassificationDataModule(pl.LightningDataModule):
    """Base class; see the module docstring. Subclasses implement `_load_splits` and
    `_detect_num_classes`, and may set `self.class_names` in `_load_splits`."""

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_classes: int | None = None,
        in_chans: int = 3,
        image_size: int = 32,
        crop_pct: float = 1.0,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        augmentation: Augmentation | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        seed: int = 0,
        sampler: str | None = None,
        search_split: float | None = None,
        unlabeled: UnlabeledImages | None = None,
    ) -> None:
        super().__init__()
        check_sampler(sampler)
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise AutoclsError(f"data.{key}={value} must be a positive whole number of images per batch.")
        if search_split is not None and not 0.0 < search_split < 1.0:
            raise AutoclsError(
                f"data.search_split={search_split} must be between 0 and 1 (the fraction of the train split that "
                "trains the weights, 0.5 in DARTS), or null for an ordinary training run."
            )
        if len(mean) != in_chans or len(std) != in_chans:
            raise AutoclsError(
                f"data.mean and data.std need {in_chans} values (one per channel, data.in_chans={in_chans}), "
                f"got {len(mean)} and {len(std)}; fix the data config."
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.expected_num_classes = num_classes
        self.in_chans, self.image_size, self.crop_pct = in_chans, image_size, crop_pct
        self.mean, self.std = tuple(mean), tuple(std)
        self.augmentation = augmentation or Augmentation()
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.sampler = sampler  # how training epochs are drawn (class re-balancing); see sampling.py
        # architecture search (DARTS): train batches come as {"weights": ..., "arch": ...} from two
        # fixed, stratified, disjoint parts of the train split; see train_dataloader
        self.search_split = search_split
        # images without labels mixed into training batches for distillation (SSLD); see unlabeled.py
        self.unlabeled = unlabeled
        self._unlabeled_pool: TensorSplit | FileSplit | None = None
        if unlabeled is not None and self.augmentation.mixing is not None:
            raise AutoclsError(
                "data.unlabeled cannot be combined with batch mixing (Mixup/CutMix), which would blend unlabeled "
                "images into labelled targets; set augmentation.mixing=null or remove data.unlabeled."
            )
        if unlabeled is not None and search_split is not None:
            raise AutoclsError("data.unlabeled is for distillation, not architecture search; remove data.unlabeled or data.search_split.")
        self.class_names: list[str] | None = None
        self.splits: dict[str, TensorSplit | FileSplit] = {}
        self.skipped_files: list = []  # SkippedFile records, written to the run dir by the train task
        self._num_classes: int | None = None
        self._norm_stats: dict = {}  # (device, dtype) -> (mean, std) tensors shaped (1, C, 1, 1)

    # --- what subclasses provide -------------------------------------------------------------
    def _detect_num_classes(self) -> int:
        """Number of classes, found cheaply (no decoding, no download)."""
        raise NotImplementedError

    def _load_splits(self) -> dict[str, TensorSplit | FileSplit]:
        """Load train/val/test; may set `self.class_names` and extend `self.skipped_files`."""
        raise NotImplementedError

    # --- description -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            found = self._detect_num_classes()
            if self.expected_num_classes is not None and self.expected_num_classes != found:
                raise AutoclsError(
                    f"data.num_classes={self.expected_num_classes} but the data has {found} classes; "
                    f"remove the override or set data.num_classes={found}."
                )
            if found < 2:
                raise AutoclsError(
                    f"The data has {found} class{'es' if found != 1 else ''}; a classifier needs at least 2, so point "
                    "data.data_dir at a folder with one sub-folder (or list-file label) per class."
                )
            self._num_classes = found
        return self._num_classes

    def describe(self) -> dict:
        """What a checkpoint needs to preprocess images and name predictions."""
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names or [str(i) for i in range(self.num_classes)]),
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            # the eval crop (resize to image_size / crop_pct, centre square): prediction repeats it
            "crop_pct": self.crop_pct,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    # --- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:  # idempotent: the task functions and Lightning may both call it
            return
        splits = self._load_splits()
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise RuntimeError(f"{type(self).__name__}._load_splits returned no {missing} split")
        for name, split in splits.items():
            if len(split) == 0:
                raise AutoclsError(f"The {name} split of {type(self).__name__} is empty; check the data path and split settings.")
        _ = self.num_classes  # validate the expected class count early
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise RuntimeError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        self.splits = splits
        if self.search_split is not None:
            self.splits.update(zip(SEARCH_HALVES, _split_in_two(splits["train"], self.search_split, self.seed)))
        sizes = ", ".join(f"{k}={len(v)}" for k, v in splits.items())
        kind = "in memory" if isinstance(splits["train"], TensorSplit) else "streamed from disk"
        log.info(f"{type(self).__name__}: {self.num_classes} classes, {sizes} images ({kind})")

    def train_dataloader(self):
        if self.search_split is None:
            loader = self._loader("train", shuffle=True)
            # data.unlabeled: {"labelled": batch, "unlabeled": batch} pairs, joined in on_after_batch_transfer
            return loader if self.unlabeled is None else with_unlabeled(self, loader)
        from pytorch_lightning.utilities import CombinedLoader

        # one batch from each half per step; the epoch ends with the shorter half
        weights, arch = (self._loader(name, shuffle=True) for name in SEARCH_HALVES)
        return CombinedLoader({"weights": weights, "arch": arch}, mode="min_size")

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 batch on the device -> (augmented) normalised float batch; training batches may be
        mixed (Mixup/CutMix), which turns their labels into probability targets."""
        if isinstance(batch, dict) and "unlabeled" in batch:  # data.unlabeled: one batch, labelled images first
            batch = join_parts({key: self._decoded(part) for key, part in batch.items()})
        if isinstance(batch, dict):  # a search step's {"weights": batch, "arch": batch}: each augmented alike
            return {key: self.on_after_batch_transfer(part, dataloader_idx) for key, part in batch.items()}
        images, labels = self._decoded(batch)
        images = images.float().div_(255)
        if images.ndim == 5:  # streamed multi-view samples (B, V, C, H, W): views stacked as on the device
            images = images.transpose(0, 1).flatten(0, 1)
        trainer = self.trainer
        training = trainer is not None and trainer.training
        if training and self.augments_on_device:
            images = self.augmentation(images)
        images = self.normalize(images)
        if training:  # mixing needs the whole batch, so streamed batches are mixed here too
            images, labels = self.augmentation.mix(images, labels, self.num_classes)
        return images, labels

    def decode_on_device(self, images, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as a uint8 tensor batch. They already are, except where a subclass moves decoding
        onto the device (the folder modules' `data.gpu_decode`); it overrides this, not
        `on_after_batch_transfer`, so the joined and split batch kinds above get decoded per part."""
        return images, labels

    def _decoded(self, part):
        return None if part is None else self.decode_on_device(*part)

    def unlabeled_pool(self, device: torch.device | None = None) -> TensorSplit | FileSplit:
        """The `data.unlabeled` images (labels -1), read on first use (training needs them, evaluation
        never); in-memory ones moved to `device` once."""
        if self._unlabeled_pool is None:
            pool, skipped = load_pool(self.unlabeled, self.splits["train"], self.image_size, self.in_chans,
                                      getattr(self, "decode_threads", 0))
            self.skipped_files.extend(skipped)
            self._unlabeled_pool = pool
            log.info(f"Unlabeled images: {len(pool)} ({self.unlabeled.describe()})")
        pool = self._unlabeled_pool
        if device is not None and isinstance(pool, TensorSplit) and pool.images.device != device:
            pool = self._unlabeled_pool = TensorSplit(pool.images.to(device), pool.labels.to(device))
        return pool

    @property
    def augments_on_device(self) -> bool:
        """Whether training batches arrive un-augmented, to be augmented here per batch (in-memory data;
        streamed images were augmented per sample by the workers)."""
        return isinstance(self.splits.get("train"), TensorSplit)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        key = (images.device, images.dtype)
        if key not in self._norm_stats:
            # built once per device: a fresh host-to-device copy every step would sit on the hot path
            shape = (1, -1, 1, 1)
            self._norm_stats[key] = tuple(
                torch.tensor(v, device=images.device, dtype=images.dtype).view(shape) for v in (self.mean, self.std)
            )
        mean, std = self._norm_stats[key]
        return (images - mean) / std

    # --- loaders -----------------------------------------------------------------------------
    def _loader(self, name: str, shuffle: bool):
        if not self.splits:
            self.setup()
        split = self.splits[name]
        batch_size = self.batch_size if _is_training_split(name) else self.eval_batch_size
        if isinstance(split, TensorSplit):
            return self._device_batches(name, split, batch_size, shuffle)
        return self._file_loader(name, split, batch_size, shuffle)

    def _device_batches(self, name: str, split: TensorSplit, batch_size: int, shuffle: bool) -> DeviceBatches:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if split.images.device != device:  # once per fit; later loaders reuse the resident copy
            split = self.splits[name] = TensorSplit(split.images.to(device), split.labels.to(device))
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = self.sampler if shuffle else None
        return DeviceBatches(
            split.images,
            split.labels,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and epoch_size(split.labels, sampler) > batch_size,
            # the arch half gets its own order, so the same weight/arch images do not meet every epoch
            seed=self.seed + (1 if name == "search_arch" else 0),
            progress_fn=self._train_progress if shuffle else (lambda: (0, 0)),
            rank=rank,
            world_size=world,
            sampling=sampler,
        )

    def _train_progress(self) -> tuple[int, int]:
        """(epoch, batches already trained in it): non-zero only when resuming mid-epoch."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        epoch_loop = trainer.fit_loop.epoch_loop
        done = epoch_loop.batch_progress.current.completed if epoch_loop.restarting else 0
        return trainer.current_epoch, done

    def _file_dataset(self, name: str, split: FileSplit):
        """(dataset, collate_fn) of a streamed split: decoded and transformed per sample in the workers."""
        from src.datamodules.image_files import ImageFileDataset, collate_skip_none

        if _is_training_split(name):
            transform = self.augmentation.sample_transform(self.image_size)
        else:
            # the standard eval crop: shorter side to image_size / crop_pct, then the centre square
            resize = round(self.image_size / self.crop_pct)
            transform = v2.Compose([v2.Resize(resize), v2.CenterCrop(self.image_size), v2.PILToTensor()])
        return ImageFileDataset(split.samples, transform=transform), collate_skip_none

    def _file_loader(self, name: str, split: FileSplit, batch_size: int, shuffle: bool) -> DataLoader:
        dataset, collate_fn = self._file_dataset(name, split)
        trainer = self.trainer
        # a sampler replaces the DataLoader's own shuffling (the two are mutually exclusive)
        sampler = ClassBalancedSampler(split_labels(split), self.sampler, self.seed) if shuffle and self.sampler else None
        epoch_samples = len(sampler) if sampler is not None else len(split)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=shuffle and epoch_samples > batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and trainer is not None and trainer.strategy.root_device.type == "cuda",
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
        )


def _is_training_split(name: str) -> bool:
    return name == "train" or name in SEARCH_HALVES


def _split_in_two(split: TensorSplit | FileSplit, fraction: float, seed: int) -> tuple:
    """(first, second): a stratified, seeded partition of `split` with `fraction` of it in the first."""
    first, second = stratified_split(split_labels(split), 1.0 - fraction, seed)
    if not len(first) or not len(second):
        raise AutoclsError(
            f"data.search_split={fraction} leaves one part of the {len(split)} training images empty; "
            "use a fraction nearer 0.5 or more data."
        )
    if isinstance(split, TensorSplit):
        return TensorSplit(split.images[first], split.labels[first]), TensorSplit(split.images[second], split.labels[second])
    return FileSplit([split.samples[i] for i in first]), FileSplit([split.samples[i] for i in second])


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, held_out) with `fraction` of the images held out (or exactly that many when
    `fraction` >= 1), spread over the classes in proportion to their sizes and chosen by `seed`: the
    same split on every run and machine."""
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    total = min(n, int(fraction) if fraction >= 1 else round(n * fraction))
    classes, counts = torch.unique(labels, return_counts=True)
    # largest-remainder apportionment: per-class quotas that add up to exactly `total`
    exact = counts.double() * total / n
    quota = exact.floor().long()
    order = torch.argsort(exact - quota, descending=True, stable=True)
    quota[order[: total - int(quota.sum())]] += 1
    held = []
    for c, k in zip(classes.tolist(), quota.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        held.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    held_out = torch.cat(held).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_out] = False
    return torch.nonzero(mask).flatten(), held_out


def train_val_test_split(
    labels: torch.Tensor, val_fraction: float, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (train, val, test) of one labelled pool: `test_fraction` of it held out first, then
    `val_fraction` of the whole from the rest, both stratified and seeded (a fraction of 0 gives an
    empty split)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise AutoclsError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must each be in [0, 1) and "
            "leave images to train on (a sum below 1, e.g. 0.1 and 0.1)."
        )
    rest, test = stratified_split(labels, test_fraction, seed)
    keep, val = stratified_split(labels[rest], val_fraction / (1 - test_fraction), seed + 1)
    return rest[keep], rest[val], test


def resolve_dir(path: str | Path, fix: str) -> Path:
    """`data.data_dir` as an existing directory, or a one-sentence error ending in `fix`."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise AutoclsError(f"data.data_dir={p} does not exist; {fix}")
    return p
