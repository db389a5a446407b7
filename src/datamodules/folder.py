"""Data modules over image files: an ImageFolder tree, PaddleClas list files, Flowers-102.

They share `FileDataModule`, which decides per run whether the images fit in memory (decoded once
into a uint8 tensor that lives on the device, as for CIFAR) or stream through DataLoader workers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from src.datamodules.base import (
    ClassificationDataModule,
    FileSplit,
    TensorSplit,
    resolve_dir,
    train_val_test_split,
)
from src.datamodules.decode_cache import cached_decode
from src.datamodules.gpu_jpeg import (
    EncodedBatch,
    EncodedImageDataset,
    collate_encoded,
    decode_batch,
)
from src.datamodules.image_files import (
    decode_to_tensor,
    read_class_names,
    read_list_file,
    scan_class_folders,
)
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FileDataModule(ClassificationDataModule):
    """Base for data read from image files. Subclasses return `(path, label)` lists per split from
    `_sample_splits`.

    `in_memory`: `true` decodes every split once into memory at `image_size` (train: shorter side
    resized to `image_size` and centre-cropped, so device augmentation sees the whole image; val/test:
    the eval crop with `crop_pct`); `false` streams; `auto` decodes when the decoded splits need at
    most `max_memory_gb`. `decode_cache`: a folder where decoded splits are kept for later runs
    (`src.datamodules.decode_cache`; null decodes every run), `decode_threads` (0: all cores) decode.
    `gpu_decode`: streamed splits send JPEG bytes from the workers and decode them a batch at a time
    on the GPU, then augment on the device (`src.datamodules.gpu_jpeg`; needs CUDA).
    """

    def __init__(
        self,
        in_memory: bool | str = "auto",
        max_memory_gb: float = 4.0,
        decode_threads: int = 0,
        decode_cache: str | None = None,
        gpu_decode: bool = False,
        **kwargs,
    ) -> None:
        kwargs.setdefault("image_size", 224)
        kwargs.setdefault("mean", IMAGENET_MEAN)
        kwargs.setdefault("std", IMAGENET_STD)
        super().__init__(**kwargs)
        if in_memory not in (True, False, "auto"):
            raise AutoclsError(f"data.in_memory={in_memory!r} is not one of true, false, auto; pick one.")
        self.in_memory, self.max_memory_gb, self.decode_threads = in_memory, max_memory_gb, decode_threads
        self.decode_cache, self.gpu_decode = decode_cache, gpu_decode

    def _sample_splits(self) -> dict[str, list[tuple[str, int]]]:
        raise NotImplementedError

    # --- batch GPU JPEG decoding of streamed splits (data.gpu_decode) ---------------------------
    @property
    def augments_on_device(self) -> bool:
        return super().augments_on_device or self.gpu_decode

    def _file_dataset(self, name: str, split: FileSplit):
        if not self.gpu_decode:
            return super()._file_dataset(name, split)
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if device.type != "cuda":
            raise AutoclsError(
                f"data.gpu_decode=true decodes JPEGs on a CUDA GPU but this run trains on {device.type}; "
                "set data.gpu_decode=false (the DataLoader workers then decode on the CPU) or use trainer=gpu."
            )
        return EncodedImageDataset(split.samples), collate_encoded

    def decode_on_device(self, images, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, EncodedBatch):
            training = self.trainer is not None and self.trainer.training
            # train: the whole image at image_size (augmentation crops next), as in-memory data is stored
            crop_pct = 1.0 if training else self.crop_pct
            images, decoded = decode_batch(images, self.image_size, crop_pct, labels.device)
            labels = labels[decoded]
        return images, labels

    def _fits_in_memory(self, num_images: int) -> bool:
        if self.in_memory != "auto":
            return bool(self.in_memory)
        needed_gb = num_images * 3 * self.image_size**2 / 1e9
        return needed_gb <= self.max_memory_gb

    def _load_splits(self) -> dict[str, TensorSplit | FileSplit]:
        samples = self._sample_splits()
        # the test split may be the val split itself: decode it once
        unique = {id(s): s for s in samples.values()}
        num_images = sum(len(s) for s in unique.values())
        if not self._fits_in_memory(num_images):
            if self.in_memory == "auto":
                log.info(
                    f"{num_images} images at {self.image_size}px need "
                    f"{num_images * 3 * self.image_size**2 / 1e9:.1f} GB decoded, more than data.max_memory_gb="
                    f"{self.max_memory_gb:g}: streaming them from disk with {self.num_workers} workers instead."
                )
            return {name: FileSplit(s) for name, s in samples.items()}
        decoded: dict[int, TensorSplit] = {}
        for name, split_samples in samples.items():
            if id(split_samples) not in decoded:
                crop_pct = 1.0 if name == "train" else self.crop_pct
                if self.decode_cache:
                    images, labels, skipped = cached_decode(
                        self.decode_cache, name, split_samples, self.image_size, crop_pct, self.decode_threads
                    )
                else:
                    images, labels, skipped = decode_to_tensor(split_samples, self.image_size, crop_pct, self.decode_threads)
                self.skipped_files.extend(skipped)
                decoded[id(split_samples)] = TensorSplit(images, labels)
        return {name: decoded[id(s)] for name, s in samples.items()}


class ImageFolderDataModule(FileDataModule):
    """Images in class folders.

    `data_dir/train/<class>/*` with optional `val/` and `test/` beside it; without `val/`, a seeded
    stratified `val_fraction` of train validates (`val_fraction=0`: the test split validates, as
    CIFAR's `val_size=0`), and without `test/` the val split tests. A
    `data_dir` that holds class folders directly is split into train/val/test by `val_fraction` and
    `test_fraction`. Non-image files are skipped and listed in the run directory.
    """

    def __init__(
        self,
        data_dir: str,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.data_dir = resolve_dir(
            data_dir,
            "set data.data_dir to a folder holding train/<class>/ images (and optionally val/, test/) "
            "or class folders directly.",
        )
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self._train_scan: tuple | None = None

    @property
    def _has_split_folders(self) -> bool:
        return (self.data_dir / "train").is_dir()

    def _scan_train(self) -> tuple[list[tuple[str, int]], list[str], list]:
        if self._train_scan is None:
            root = self.data_dir / "train" if self._has_split_folders else self.data_dir
            self._train_scan = scan_class_folders(root)
        return self._train_scan

    def _detect_num_classes(self) -> int:
        return len(self._scan_train()[1])

    def _sample_splits(self) -> dict[str, list[tuple[str, int]]]:
        train, class_names, skipped = self._scan_train()
        self.class_names = class_names
        self.skipped_files.extend(skipped)
        extra = {}
        for name in ("val", "test"):
            folder = self.data_dir / name
            if self._has_split_folders and folder.is_dir():
                extra[name], _, skipped = scan_class_folders(folder, class_names=class_names)
                self.skipped_files.extend(skipped)
        test_fraction = 0.0 if "test" in extra or self._has_split_folders else self.test_fraction
        train, val, test = _split_samples(train, self.val_fraction if "val" not in extra else 0.0,
                                          test_fraction, self.split_seed)
        val = extra.get("val", val)
        test = extra.get("test", test if test else val)
        if not val:  # val_fraction=0: all of train/ trains, and the test split validates
            val = test
        return {"train": train, "val": val, "test": test}


class ListFileDataModule(FileDataModule):
    """PaddleClas-style list files: one `relative/path.jpg <label>` line per image (`delimiter`
    configurable), paths relative to `data_dir`. `test_list` is optional (val tests then); class
    names come from `class_names_file` (`0 name` lines or one name per line) or default to the
    label numbers."""

    def __init__(
        self,
        data_dir: str,
        train_list: str,
        val_list: str,
        test_list: str | None = None,
        delimiter: str = " ",
        class_names_file: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.data_dir = resolve_dir(
            data_dir, "set data.data_dir to the folder the list files' paths start from."
        )
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self.delimiter, self.class_names_file = delimiter, class_names_file
        self._samples: dict[str, list[tuple[str, int]]] | None = None

    def _path(self, name: str | None) -> Path | None:
        if name is None:
            return None
        p = Path(name).expanduser()
        return p if p.is_absolute() else self.data_dir / p

    def _read_lists(self) -> dict[str, list[tuple[str, int]]]:
        if self._samples is None:
            samples = {}
            for split, name in self.lists.items():
                if name is not None:
                    samples[split], skipped = read_list_file(self._path(name), self.data_dir, self.delimiter)
                    self.skipped_files.extend(skipped)
            samples.setdefault("test", samples["val"])
            self._samples = samples
        return self._samples

    def _detect_num_classes(self) -> int:
        if self.class_names_file:
            return len(self._class_names_from_file())
        return 1 + max(label for split in self._read_lists().values() for _, label in split)

    def _class_names_from_file(self) -> list[str]:
        return read_class_names(self._path(self.class_names_file))

    def _sample_splits(self) -> dict[str, list[tuple[str, int]]]:
        samples = self._read_lists()
        num_classes = self.num_classes
        for split, split_samples in samples.items():
            bad = [label for _, label in split_samples if label >= num_classes]
            if bad:
                raise AutoclsError(
                    f"The {split} list has label {max(bad)} but there are only {num_classes} classes "
                    f"(from {self.class_names_file or 'the labels'}); fix the list or the class names file."
                )
        self.class_names = self._class_names_from_file() if self.class_names_file else [str(i) for i in range(num_classes)]
        return samples


class Flowers102DataModule(FileDataModule):
    """Oxford Flowers-102 (Nilsback & Zisserman 2008), the PaddleClas transfer-learning benchmark:
    1,020 train / 1,020 val / 6,149 test images of 102 classes. Downloaded by torchvision into
    `data_dir/flowers-102` when absent."""

    def __init__(self, data_dir: str = "data", download: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.download = Path(data_dir).expanduser(), download

    @property
    def folder(self) -> Path:
        return self.root / "flowers-102"

    def _detect_num_classes(self) -> int:
        return 102

    def prepare_data(self) -> None:
        if (self.folder / "setid.mat").exists() and (self.folder / "jpg").is_dir():
            return
        if not self.download:
            raise AutoclsError(f"Flowers-102 not found in {self.folder}; set data.download=true or point data.data_dir at its parent.")
        import torchvision

        try:
            torchvision.datasets.Flowers102(str(self.root), download=True)
        except (OSError, RuntimeError) as err:
            raise AutoclsError(
                f"Could not download Flowers-102 into {self.root} ({err}); download it by hand into {self.folder}."
            ) from err

    def _sample_splits(self) -> dict[str, list[tuple[str, int]]]:
        from scipy.io import loadmat
        from torchvision.datasets import Flowers102

        self.prepare_data()
        set_ids = loadmat(self.folder / "setid.mat", squeeze_me=True)
        labels = loadmat(self.folder / "imagelabels.mat", squeeze_me=True)["labels"]
        self.class_names = list(Flowers102.classes) if hasattr(Flowers102, "classes") else None

        def split(key: str) -> list[tuple[str, int]]:
            ids = [int(i) for i in set_ids[key].ravel()]
            return [(str(self.folder / "jpg" / f"image_{i:05d}.jpg"), int(labels[i - 1]) - 1) for i in ids]

        return {"train": split("trnid"), "val": split("valid"), "test": split("tstid")}


def _split_samples(samples: list[tuple[str, int]], val_fraction: float, test_fraction: float, seed: int):
    """Seeded stratified train/val/test lists from one list."""
    labels = torch.tensor([label for _, label in samples])
    splits = train_val_test_split(labels, val_fraction, test_fraction, seed)
    return tuple([samples[i] for i in idx.tolist()] for idx in splits)
