"""Decoded in-memory splits cached on disk, so only the first run over a folder pays for decoding.

Decoding 50k JPEGs with PIL takes tens of seconds on a few cores, longer than a short AutoML trial
trains. `cached_decode` decodes a split once (in parallel, `decode_to_tensor`), stores the uint8
images as a `.npy` file plus a small JSON manifest in `cache_dir`, and later runs map that file
into memory instead of decoding.

An entry is named by what the images are: the folder the files share, the split, and the decode
settings (image size, crop). Its manifest records a fingerprint of the files (every path, label,
size and modification time, which also fixes their count); when the source changes (a file added,
removed, relabelled or touched) the fingerprint differs and the entry is rebuilt in place. Files
that could not be decoded are kept in the manifest, so a cached run reports the same skipped files.

Entries are written to a temporary name and renamed, so a crashed or concurrent run never leaves a
half-written entry that looks valid. Entries whose source folder no longer exists are deleted when
a new entry is written. An unwritable cache folder only costs the caching (a logged warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from src.datamodules.image_files import SkippedFile, decode_to_tensor

log = logging.getLogger(__name__)

# Bump when the decoding itself changes (resize filter, colour handling): old entries then miss.
CACHE_VERSION = 1


def fingerprint(samples: Sequence[tuple[str, int]]) -> str:
    """A hash of every sample's path, label, byte size and modification time (ns)."""
    digest = hashlib.sha256()
    for path, label in samples:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path}\t{label}\t{stamp}\n".encode())
    return digest.hexdigest()


def source_of(samples: Sequence[tuple[str, int]]) -> str:
    """The deepest folder that holds every sample file."""
    folders = {os.path.dirname(os.path.abspath(path)) for path, _ in samples}
    return os.path.commonpath(sorted(folders))


def entry_name(source: str, split: str, size: int, crop_pct: float) -> str:
    key = json.dumps([CACHE_VERSION, source, split, int(size), float(crop_pct)])
    return f"{split}-{size}px-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cached_decode(
    cache_dir: str | os.PathLike[str],
    split: str,
    samples: Sequence[tuple[str, int]],
    size: int,
    crop_pct: float = 1.0,
    num_threads: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[SkippedFile]]:
    """`decode_to_tensor(samples, size, crop_pct, num_threads)` through the cache in `cache_dir`:
    the same `(images, labels, skipped)`, read from the cache when its entry for these files and
    settings is current, else decoded and stored. Cached images are a copy-on-write memory map of
    the cache file."""
    cache_dir = Path(cache_dir).expanduser()
    source = source_of(samples)
    name = entry_name(source, split, size, crop_pct)
    stamp = fingerprint(samples)
    manifest_path, array_path = cache_dir / f"{name}.json", cache_dir / f"{name}.npy"

    cached = _read_entry(manifest_path, array_path, stamp)
    if cached is not None:
        images, kept, skipped = cached
        labels = torch.tensor([samples[i][1] for i in kept], dtype=torch.int64)
        if skipped:
            log.warning("Skipped %d of %d images that could not be decoded (as recorded in the decode cache).",
                        len(skipped), len(samples))
        log.info(f"Read {len(kept)} decoded {split} images from the decode cache {array_path}")
        return images, labels, skipped

    start = time.perf_counter()
    images, labels, skipped = decode_to_tensor(samples, size, crop_pct, num_threads)
    elapsed = time.perf_counter() - start
    manifest = {
        "version": CACHE_VERSION,
        "source": source,
        "split": split,
        "image_size": int(size),
        "crop_pct": float(crop_pct),
        "num_files": len(samples),
        "fingerprint": stamp,
        "shape": list(images.shape),
        "skipped": [[i, samples[i][0], s.reason] for i, s in _skipped_indices(samples, skipped)],
        "decode_seconds": round(elapsed, 2),
    }
    try:
        _write_entry(cache_dir, manifest_path, array_path, images, manifest)
    except OSError as err:
        log.warning(f"Could not write the decode cache in {cache_dir} ({err}); later runs will decode again.")
    else:
        log.info(f"Decoded {len(images)} {split} images in {elapsed:.1f} s; cached in {array_path}")
    return images, labels, skipped


def _skipped_indices(samples, skipped: list[SkippedFile]):
    """(index, SkippedFile) pairs: `decode_to_tensor` reports skips in sample order."""
    pending = iter(skipped)
    current = next(pending, None)
    for i, (path, _) in enumerate(samples):
        if current is not None and path == current.path:
            yield i, current
            current = next(pending, None)


def _read_entry(manifest_path: Path, array_path: Path, stamp: str):
    """(images, kept sample indices, skipped) of a current entry, or None (absent, stale or unreadable)."""
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") != CACHE_VERSION or manifest.get("fingerprint") != stamp:
            log.info(f"The decode cache {array_path} is out of date (its files changed); decoding again.")
            return None
        array = np.load(array_path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    if list(array.shape) != manifest["shape"] or array.dtype != np.uint8:
        return None
    skipped_at = {i for i, _, _ in manifest["skipped"]}
    kept = [i for i in range(manifest["num_files"]) if i not in skipped_at]
    skipped = [SkippedFile(path, reason) for _, path, reason in manifest["skipped"]]
    return torch.from_numpy(array), kept, skipped


def _write_entry(cache_dir: Path, manifest_path: Path, array_path: Path, images: torch.Tensor, manifest: dict) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    _prune(cache_dir)
    suffix = f".{os.getpid()}.tmp"  # concurrent writers (DDP ranks, sweeps) each rename a whole file
    tmp_array, tmp_manifest = array_path.with_name(array_path.name + suffix), manifest_path.with_name(manifest_path.name + suffix)
    with open(tmp_array, "wb") as f:
        np.save(f, images.numpy())
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    # the manifest goes last: an entry is valid only once its manifest names the array's fingerprint
    manifest_path.unlink(missing_ok=True)
    os.replace(tmp_array, array_path)
    os.replace(tmp_manifest, manifest_path)


def _prune(cache_dir: Path) -> None:
    """Delete entries whose source folder is gone (e.g. a temporary dataset)."""
    for manifest_path in cache_dir.glob("*.json"):
        try:
            source = json.loads(manifest_path.read_text()).get("source")
        except (OSError, ValueError):
            continue
        if source and not os.path.isdir(source):
            manifest_path.unlink(missing_ok=True)
            manifest_path.with_suffix(".npy").unlink(missing_ok=True)
