"""A pool of unlabeled images for SSLD: images of an ImageFolder tree that a labelled subset does not use,
`--per-class` of each class drawn at random (seeded), hard-linked (or copied) into `--out`.

    python scripts/unpack_archive.py ../shared/data/cifar10-jpg.tar.gz data/cifar10_full
    python scripts/make_unlabeled_pool.py --source data/cifar10_full/train \
        --exclude data/cifar10_jpg_600/train --per-class 2000 --out data/cifar10_unlabeled_20k

then `+data/unlabeled=folder data.unlabeled.data_dir=data/cifar10_unlabeled_20k` (class folder names are
kept for inspection; the unlabeled data module ignores them). docs/distillation.md's SSLD figure used
exactly this command.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path


def make_pool(source: Path, exclude: Path | None, per_class: int, out: Path, seed: int = 0) -> int:
    """Link `per_class` images per class of `source` that `exclude/<class>/` lacks (by file name) into
    `out/<class>/`; returns how many. One seeded generator draws the classes in sorted order."""
    rng = random.Random(seed)
    count = 0
    for cls in sorted(d.name for d in source.iterdir() if d.is_dir()):
        used = set(os.listdir(exclude / cls)) if exclude is not None and (exclude / cls).is_dir() else set()
        candidates = sorted(f for f in os.listdir(source / cls) if f not in used)
        if len(candidates) < per_class:
            raise SystemExit(f"{source / cls} has only {len(candidates)} images outside {exclude}; lower --per-class.")
        (out / cls).mkdir(parents=True, exist_ok=True)
        for name in rng.sample(candidates, per_class):
            target = out / cls / name
            if not target.exists():
                try:
                    os.link(source / cls / name, target)
                except OSError:  # another file system: copy
                    shutil.copy2(source / cls / name, target)
            count += 1
    return count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="an ImageFolder split: <source>/<class>/<image>")
    parser.add_argument("--exclude", type=Path, default=None, help="the labelled subset's split, same layout")
    parser.add_argument("--per-class", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = make_pool(args.source, args.exclude, args.per_class, args.out, args.seed)
    print(f"{n} unlabeled images in {args.out}")
