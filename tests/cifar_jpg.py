"""Reusable access to the shared CIFAR-10 JPEG archive for real-data tests.

The archive (`train/<class>/NNNN.jpg`, `test/<class>/NNNN.jpg`, 32x32 JPEGs) is a 20 MB
.tar.gz. Random access into a gzip stream re-reads it from the start for every member, so the
helpers here read it once, sequentially, and keep only a few images per class.

tests/ is not a package; import this module with `tests/` on sys.path, e.g.
`sys.path.insert(0, str(Path(__file__).parent))` then `from cifar_jpg import ...`.
"""

from __future__ import annotations

import os
from pathlib import Path

from src.datamodules.archive import extract_image_archive

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
SPLITS = ("train", "test")
ENV_VAR = "AUTOCLS_CIFAR_JPG"
# the shared folder sits beside the project checkout
CANDIDATES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz",
    Path("/work/shared/data/cifar10-jpg.tar.gz"),
)


def cifar_jpg_archive() -> Path | None:
    """The archive path ($AUTOCLS_CIFAR_JPG, else the shared copy), or None if it is absent."""
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR])
        return path if path.is_file() else None
    return next((p for p in CANDIDATES if p.is_file()), None)


def extract_cifar_jpg_subset(
    archive: str | os.PathLike[str], dest: str | os.PathLike[str], per_class: int
) -> Path:
    """The first `per_class` images of every class of train and test in `dest/{train,test}/<class>/`,
    read in one sequential pass that stops once all 20 class folders are full."""
    dest = extract_image_archive(archive, dest, per_class=per_class, num_folders=len(SPLITS) * len(CIFAR10_CLASSES))
    short = [f"{s}/{c}" for s in SPLITS for c in CIFAR10_CLASSES
             if len(list((dest / s / c).glob("*.jpg"))) < per_class]
    if short:
        raise RuntimeError(f"{archive} has fewer than {per_class} images for {short}")
    return dest
