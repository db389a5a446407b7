"""Unpacking image datasets shipped as .tar.gz archives.

A gzip stream has no index, so reading members by name re-decompresses from the start each time:
quadratic in the archive size. Here the archive is read once, front to back.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


def extract_image_archive(
    archive: str | Path, dest: str | Path, per_class: int | None = None, num_folders: int | None = None
) -> Path:
    """Unpack an ImageFolder-layout archive (`<split>/<class>/<file>`, an optional top folder is kept
    as is) into `dest`, keeping at most `per_class` files of every class folder when given.

    One sequential pass over the stream, in whatever order the archive holds its members. When the
    caller knows how many class folders there are (`num_folders`, e.g. 20 for CIFAR-10's train and
    test), a subset stops reading as soon as all of them are full. A marker file makes a repeated
    call with the same `per_class` free.
    """
    dest = Path(dest)
    marker = dest / f".unpacked-{per_class or 'all'}"
    if marker.is_file():
        return dest
    counts: Counter[tuple[str, ...]] = Counter()
    written = 0
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = tuple(p for p in PurePosixPath(member.name).parts if p not in (".", ".."))
            if len(parts) < 3:
                continue
            group = parts[:-1]  # (..., split, class)
            if per_class is not None and counts[group] >= per_class:
                continue
            # write from validated name parts (no tar.extract): a crafted name cannot escape dest
            out = dest.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)
            counts[group] += 1
            written += 1
            full = per_class is not None and sum(c >= per_class for c in counts.values())
            if num_folders is not None and full == num_folders:
                break
    marker.touch()
    log.info(f"Unpacked {written} files of {len(counts)} class folders from {archive} into {dest}")
    return dest


def ensure_split_folders(data_dir: str | Path, splits: tuple[str, ...] = ("train", "test"),
                         archive: str | Path | None = None) -> Path:
    """`data_dir` as an ImageFolder root holding `splits` (`<split>/<class>/<image>`), as the benchmark
    scripts read it; unpacked from `archive` first when a split is missing and an archive is given.
    Otherwise one sentence naming both ways to fix it."""
    data_dir = Path(data_dir).expanduser().resolve()
    missing = [s for s in splits if not (data_dir / s).is_dir()]
    if missing and archive is not None:
        if not Path(archive).is_file():
            raise AutoclsError(f"--archive {archive} does not exist; pass the shared CIFAR-10 copy "
                               "(../shared/data/cifar10-jpg.tar.gz) or another ImageFolder .tar.gz.")
        print(f"unpacking {archive} into {data_dir} ...", flush=True)  # scripts call this; they configure no logging
        extract_image_archive(archive, data_dir)
        missing = [s for s in splits if not (data_dir / s).is_dir()]
    if missing:
        wanted = " and ".join(f"{s}/" for s in splits)
        raise AutoclsError(
            f"{data_dir} has no {' or '.join(f'{s}/' for s in missing)}; pass --data-dir <folder with {wanted} class "
            "folders> (scripts/unpack_archive.py ../shared/data/cifar10-jpg.tar.gz <folder> makes one)."
        )
    return data_dir
