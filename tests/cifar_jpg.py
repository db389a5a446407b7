"""Reusable access to the shared CIFAR-10 JPEG archive for real-data tests.

The archive (`train/<class>/NNNN.jpg`, `test/<class>/NNNN.jpg`, 32x32 JPEGs) is a 20 MB
.tar.gz. Random access into a gzip stream re-reads it from the start for every member, so the
helpers here read it once, sequentially, and keep only a few images per class.

tests/ is not a package; import this module with `tests/` on sys.path, e.g.
`sys.path.insert(0, str(Path(__file__).parent))` then `from cifar_jpg import ...`.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

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
    """Extract the first `per_class` images of every class of train and test into `dest`.

    Streams the archive once ("r|gz") and stops as soon as every (split, class) pair is full,
    without assuming any member order. The result is `dest/{train,test}/<class>/NNNN.jpg`.
    A marker file makes repeated calls with the same `dest` and `per_class` free.

    Returns:
        `dest` as a Path.
    """
    dest = Path(dest)
    marker = dest / f".complete-{per_class}"
    if marker.is_file():
        return dest
    wanted = {(split, name) for split in SPLITS for name in CIFAR10_CLASSES}
    counts = dict.fromkeys(wanted, 0)
    remaining = len(wanted)

    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = [p for p in PurePosixPath(member.name).parts if p != "."]
            if len(parts) != 3 or not parts[2].lower().endswith(".jpg"):
                continue
            key = (parts[0], parts[1])
            if key not in counts or counts[key] >= per_class:
                continue
            # Write by hand from validated name parts instead of tar.extract(), so a
            # malformed member name can never escape `dest`.
            out = dest.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)
            counts[key] += 1
            if counts[key] == per_class:
                remaining -= 1
                if remaining == 0:
                    break

    short = sorted(f"{s}/{c}" for (s, c), n in counts.items() if n < per_class)
    if short:
        raise RuntimeError(f"{archive} has fewer than {per_class} images for {short}")
    marker.touch()
    return dest
