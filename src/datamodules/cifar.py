"""CIFAR-10 / CIFAR-100 (Krizhevsky 2009), held in memory as uint8 tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from src.datamodules.base import ClassificationDataModule, TensorSplit, stratified_split
from src.utils.errors import AutoclsError

# torchvision's folder names and file layout of the "python version" archives
_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
        "num_classes": 100,
    },
}


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10/100 from `data_dir`: torchvision downloads it there when absent (`download=true`), an
    existing copy of the python-version archive contents is read directly. `val_size` training images
    (stratified, seeded) are held out for validation; with `val_size=0` the test set validates."""

    def __init__(
        self,
        data_dir: str = "data",
        variant: str = "cifar10",
        download: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        **kwargs,
    ) -> None:
        if variant not in _LAYOUT:
            raise AutoclsError(f"data.variant={variant!r} is not a CIFAR variant; use cifar10 or cifar100.")
        super().__init__(**kwargs)
        self.data_dir, self.variant, self.download = Path(data_dir).expanduser(), variant, download
        self.val_size, self.split_seed = val_size, split_seed
        self.layout = _LAYOUT[variant]

    @property
    def folder(self) -> Path:
        return self.data_dir / self.layout["folder"]

    def _detect_num_classes(self) -> int:
        return self.layout["num_classes"]

    def prepare_data(self) -> None:
        if (self.folder / self.layout["meta"][0]).exists():
            return
        if not self.download:
            raise AutoclsError(
                f"CIFAR data not found in {self.folder}; set data.download=true or data.data_dir to the folder "
                f"that holds {self.layout['folder']}/."
            )
        import torchvision

        dataset = torchvision.datasets.CIFAR10 if self.variant == "cifar10" else torchvision.datasets.CIFAR100
        try:
            dataset(str(self.data_dir), train=True, download=True)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise AutoclsError(
                f"Could not download {self.variant} into {self.data_dir} ({err}); download it by hand "
                f"and point data.data_dir at the folder holding {self.layout['folder']}/."
            ) from err

    def _read(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name in names:
            path = self.folder / name
            if not path.exists():
                raise AutoclsError(f"{path} is missing; delete {self.folder} and rerun with data.download=true.")
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[self.layout["labels"]], dtype=np.int64))
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))

    def _load_splits(self) -> dict[str, TensorSplit]:
        self.prepare_data()  # no-op when present; makes setup() work outside a Trainer too
        meta_file, key = self.layout["meta"]
        with open(self.folder / meta_file, "rb") as f:
            self.class_names = list(pickle.load(f, encoding="latin1")[key])
        train_x, train_y = self._read(self.layout["train"])
        test = TensorSplit(*self._read(self.layout["test"]))
        if self.val_size <= 0:
            return {"train": TensorSplit(train_x, train_y), "val": test, "test": test}
        keep, held = stratified_split(train_y, self.val_size, self.split_seed)
        return {
            "train": TensorSplit(train_x[keep], train_y[keep]),
            "val": TensorSplit(train_x[held], train_y[held]),
            "test": test,
        }
