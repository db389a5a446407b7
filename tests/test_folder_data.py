"""ImageFolder and list-file data modules on real images: a slice of the shared CIFAR-10 JPEG copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from src.datamodules.base import FileSplit, TensorSplit
from src.datamodules.folder import ImageFolderDataModule, ListFileDataModule
from src.train import train

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_STATS = {"image_size": 32, "crop_pct": 1.0, "mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)}


def _folder(cifar_jpg_dir, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(data_dir=str(cifar_jpg_dir), val_fraction=0.1, batch_size=16, num_workers=0,
                               **CIFAR_STATS, **kwargs)
    dm.setup()
    return dm


def test_image_folder_in_memory_matches_files(cifar_jpg_dir):
    dm = _folder(cifar_jpg_dir, in_memory=True)
    assert dm.class_names == CLASSES and dm.num_classes == 10
    train, val, test = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    # train/ is split 180/20 (stratified), test/ is the test split
    assert (len(train), len(val), len(test)) == (180, 20, 200)
    assert torch.equal(torch.bincount(val.labels), torch.full((10,), 2))
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    # the first test image is the first file of the first class, decoded exactly
    first = sorted((cifar_jpg_dir / "test" / "airplane").iterdir())[0]
    expected = torch.from_numpy(np.asarray(Image.open(first).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(test.images[0], expected)


def test_streamed_loader_gives_the_same_eval_images_as_in_memory(cifar_jpg_dir):
    memory, streamed = _folder(cifar_jpg_dir, in_memory=True), _folder(cifar_jpg_dir, in_memory=False)
    batches = list(streamed.test_dataloader())
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert torch.equal(images, memory.splits["test"].images)
    assert torch.equal(labels, memory.splits["test"].labels)
    x, y = next(iter(streamed.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32) and y.shape == (16,)


def test_list_files_load_the_same_samples(cifar_jpg_dir, tmp_path):
    folder = _folder(cifar_jpg_dir, in_memory=True)
    for split in ("train", "test"):
        lines = [f"{split}/{name}/{f.name} {label}" for label, name in enumerate(CLASSES)
                 for f in sorted((cifar_jpg_dir / split / name).iterdir())]
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "labels.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(CLASSES)))
    dm = ListFileDataModule(data_dir=str(cifar_jpg_dir), train_list=str(tmp_path / "train.txt"),
                            val_list=str(tmp_path / "test.txt"), class_names_file=str(tmp_path / "labels.txt"),
                            in_memory=True, num_workers=0, **CIFAR_STATS)
    dm.setup()
    assert dm.class_names == CLASSES
    assert len(dm.splits["train"]) == 200 and dm.splits["test"] is dm.splits["val"]
    assert torch.equal(dm.splits["test"].images, folder.splits["test"].images)


@pytest.mark.parametrize("in_memory", [True, False])
def test_train_on_cifar_jpgs(compose_train, cifar_jpg_dir, in_memory):
    """A short ResNet-20 run on the JPEG folder, in memory and streamed, end to end."""
    overrides = ["data=image_folder", f"data.data_dir={cifar_jpg_dir}", "data.image_size=32", "data.crop_pct=1.0",
                 f"data.in_memory={in_memory}", "data.num_workers=0", "data.batch_size=32",
                 "model/net=resnet_cifar", "augmentation=standard", "optimizer=sgd", "trainer.max_epochs=2"]
    metrics = train(compose_train(overrides))
    assert 0.0 <= metrics["test/acc"] <= 1.0 and np.isfinite(metrics["train/loss"])


def test_auto_falls_back_to_streaming_with_a_note(cifar_jpg_dir, caplog):
    """A folder too big for data.max_memory_gb streams from disk, and the log says why."""
    with caplog.at_level("INFO", logger="src.datamodules.folder"):
        dm = _folder(cifar_jpg_dir, in_memory="auto", max_memory_gb=0.001)
    assert all(isinstance(s, FileSplit) for s in dm.splits.values())
    assert "data.max_memory_gb=0.001: streaming" in caplog.text
    assert isinstance(_folder(cifar_jpg_dir, in_memory="auto").splits["train"], TensorSplit)
