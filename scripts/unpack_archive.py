"""Unpack an ImageFolder-layout .tar.gz once, sequentially (random access into gzip is quadratic).

    python scripts/unpack_archive.py ../shared/data/cifar10-jpg.tar.gz data/cifar10_jpg [--per-class N]

then train on it: `python train.py data=image_folder data.data_dir=data/cifar10_jpg data.image_size=32 data.crop_pct=1.0`.
"""

import argparse
import logging

from src.datamodules.archive import extract_image_archive

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive")
    parser.add_argument("dest")
    parser.add_argument("--per-class", type=int, default=None, help="keep at most N files per class folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(extract_image_archive(args.archive, args.dest, per_class=args.per_class))
