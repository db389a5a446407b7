"""Tiny, format-exact stand-ins for the datasets autocls downloads, for tests that must not touch
the network.

* `make_fake_cifar` writes torchvision's "python version" pickles (the contents of
  cifar-10-python.tar.gz / cifar-100-python.tar.gz): `cifar-10-batches-py/{data_batch_1..5,
  test_batch,batches.meta}` or `cifar-100-python/{train,test,meta}`.
* `make_fake_flowers102` writes `flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}` as
  torchvision's Flowers102 leaves them.

Images are random but seeded, so a given call always writes the same bytes. tests/ is not a
package: import with `tests/` on sys.path (conftest.py puts it there).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
FLOWERS_FOLDER = "flowers-102"
FLOWERS_NUM_CLASSES = 102


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> list[int]:
    """`n` labels covering every class once n >= num_classes (0, 1, ..., k-1, 0, 1, ...), shuffled."""
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    return [int(x) for x in labels]


def _dump(path: Path, obj: dict) -> None:
    # The real archives are Python 2 pickles with str keys (bytes in py2) read with encoding="latin1";
    # protocol 2 is what cPickle wrote, and reads back identically.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_fake_cifar(
    root: str | os.PathLike[str],
    variant: str = "cifar10",
    n_train: int = 40,
    n_test: int = 20,
    seed: int = 0,
) -> Path:
    """Write a fake CIFAR-10 or CIFAR-100 in torchvision's layout under `root` and return `root`.

    `data` is uint8 (N, 3072): the 1024 red, then green, then blue values of each image in row-major
    order, as in the real batches. CIFAR-10 splits the `n_train` training images over the five
    `data_batch_i` files (as evenly as possible) with a `labels` list; CIFAR-100 has one `train` file
    with `fine_labels` and `coarse_labels`. Labels cycle through the classes before shuffling, so
    every class is present when n >= number of classes (100 for CIFAR-100: use n_train >= 200 to
    have two of each for a stratified validation split).
    """
    if variant not in ("cifar10", "cifar100"):
        raise ValueError(f"variant must be cifar10 or cifar100, got {variant!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    num_classes = 10 if variant == "cifar10" else 100

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)

    if variant == "cifar10":
        folder = root / CIFAR10_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        train_x, train_y = images(n_train), _labels(n_train, num_classes, rng)
        bounds = np.linspace(0, n_train, 6).round().astype(int)
        for i in range(5):
            lo, hi = bounds[i], bounds[i + 1]
            _dump(folder / f"data_batch_{i + 1}", {
                "batch_label": f"training batch {i + 1} of 5",
                "labels": train_y[lo:hi],
                "data": train_x[lo:hi],
                "filenames": [f"fake_train_{j:05d}.png" for j in range(lo, hi)],
            })
        _dump(folder / "test_batch", {
            "batch_label": "testing batch 1 of 1",
            "labels": _labels(n_test, num_classes, rng),
            "data": images(n_test),
            "filenames": [f"fake_test_{j:05d}.png" for j in range(n_test)],
        })
        _dump(folder / "batches.meta", {
            "num_cases_per_batch": int(bounds[1] - bounds[0]),
            "label_names": list(CIFAR10_CLASSES),
            "num_vis": 3072,
        })
        return root

    folder = root / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    fine_names = [f"fine_class_{i:02d}" for i in range(100)]
    coarse_names = [f"coarse_class_{i:02d}" for i in range(20)]
    for split, n in (("train", n_train), ("test", n_test)):
        fine = _labels(n, num_classes, rng)
        _dump(folder / split, {
            "filenames": [f"fake_{split}_{j:05d}.png" for j in range(n)],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],  # any fixed fine -> coarse map will do
            "data": images(n),
        })
    _dump(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    return root


def make_fake_flowers102(
    root: str | os.PathLike[str],
    per_split: int = 6,
    num_classes: int = 3,
    size: tuple[int, int] = (40, 30),
    seed: int = 0,
) -> Path:
    """Write a fake Oxford Flowers-102 under `root/flowers-102` and return `root`.

    `per_split` random JPEGs (width x height `size`) per split, image ids 1..3*per_split, labels
    cycling through the 1-based classes 1..`num_classes` (at most 102). `imagelabels.mat` holds
    `labels` (1, N) and `setid.mat` holds `trnid`, `valid`, `tstid` (1, k), 1-based image ids, as in
    the real files (which are uint8 / uint16 row vectors written by MATLAB).
    """
    from PIL import Image
    from scipy.io import savemat

    if not 1 <= num_classes <= FLOWERS_NUM_CLASSES:
        raise ValueError(f"num_classes must be in 1..{FLOWERS_NUM_CLASSES}, got {num_classes}")
    folder = Path(root) / FLOWERS_FOLDER
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = 3 * per_split
    width, height = size
    for image_id in range(1, n + 1):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "jpg" / f"image_{image_id:05d}.jpg", quality=90)
    labels = (np.arange(n) % num_classes + 1).astype(np.uint8)  # 1-based, like the real file
    ids = np.arange(1, n + 1, dtype=np.uint16)
    rng.shuffle(ids)
    savemat(folder / "imagelabels.mat", {"labels": labels.reshape(1, -1)})
    savemat(folder / "setid.mat", {
        "trnid": np.sort(ids[:per_split]).reshape(1, -1),
        "valid": np.sort(ids[per_split:2 * per_split]).reshape(1, -1),
        "tstid": np.sort(ids[2 * per_split:]).reshape(1, -1),
    })
    return Path(root)
