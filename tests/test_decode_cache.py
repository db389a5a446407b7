"""The decode cache of in-memory folder data: a second build reads it instead of decoding, a changed
file invalidates it, its content is a fresh decode, and unreadable files are still reported."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from src.datamodules import decode_cache
from src.datamodules.folder import ImageFolderDataModule


@pytest.fixture
def folder(tmp_path):
    """train/ (2 classes x 6 PNGs + one corrupt .jpg) and test/ (2 x 2) of 12x12 random images."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    (root / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


@pytest.fixture
def decode_calls(monkeypatch):
    """How many splits were really decoded (not read from the cache)."""
    calls = []
    real = decode_cache.decode_to_tensor

    def counting(samples, *args, **kwargs):
        calls.append(len(samples))
        return real(samples, *args, **kwargs)

    monkeypatch.setattr(decode_cache, "decode_to_tensor", counting)
    return calls


def _build(root, cache) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(data_dir=str(root), val_fraction=0.25, image_size=8, crop_pct=0.875, num_workers=0,
                               decode_threads=2, in_memory=True, decode_cache=str(cache) if cache else None)
    dm.setup()
    return dm


def _same_splits(a: ImageFolderDataModule, b: ImageFolderDataModule) -> None:
    for name in ("train", "val", "test"):
        assert torch.equal(a.splits[name].images, b.splits[name].images), name
        assert torch.equal(a.splits[name].labels, b.splits[name].labels), name


def test_second_build_reads_the_cache_and_equals_a_fresh_decode(folder, tmp_path, decode_calls):
    cache = tmp_path / "cache"
    first = _build(folder, cache)
    assert len(decode_calls) == 3  # train, val and test decoded once each
    assert len(list(cache.glob("*.npy"))) == 3 and len(list(cache.glob("*.json"))) == 3

    second = _build(folder, cache)
    assert len(decode_calls) == 3  # nothing decoded again
    _same_splits(first, second)
    _same_splits(second, _build(folder, None))  # = decoding without any cache
    assert second.splits["train"].images.dtype == torch.uint8
    assert second.splits["train"].images.shape[1:] == (3, 8, 8)


def test_a_touched_or_added_file_rebuilds_its_split(folder, tmp_path, decode_calls):
    cache = tmp_path / "cache"
    _build(folder, cache)
    assert len(decode_calls) == 3
    touched = folder / "test" / "a" / "0.png"
    Image.fromarray(np.zeros((12, 14, 3), dtype=np.uint8)).save(touched)
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    rebuilt = _build(folder, cache)
    assert len(decode_calls) == 4  # only the test split again
    assert rebuilt.splits["test"].images[0].sum() == 0  # the new content, not the cached one
    _same_splits(rebuilt, _build(folder, None))

    shutil.copy(folder / "test" / "b" / "0.png", folder / "test" / "b" / "9.png")
    assert len(_build(folder, cache).splits["test"]) == 5 and len(decode_calls) == 5


def test_unreadable_files_are_still_reported_from_the_cache(folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    fresh = _build(folder, cache)
    with caplog.at_level("WARNING"):
        cached = _build(folder, cache)
    assert "Skipped 1 of" in caplog.text
    broken = [s for s in cached.skipped_files if s.path.endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0].reason.startswith("unreadable")
    assert [(s.path, s.reason) for s in cached.skipped_files] == [(s.path, s.reason) for s in fresh.skipped_files]


def test_an_unwritable_cache_only_costs_the_caching(folder, tmp_path, caplog):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with caplog.at_level("WARNING"):
        dm = _build(folder, not_a_folder / "cache")
    assert "Could not write the decode cache" in caplog.text
    _same_splits(dm, _build(folder, None))


def test_entries_of_deleted_sources_are_pruned(folder, tmp_path):
    cache = tmp_path / "cache"
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    _build(other, cache)
    shutil.rmtree(other)
    _build(folder, cache)
    sources = {json.loads(p.read_text())["source"] for p in cache.glob("*.json")}
    assert sources == {str(folder / "train"), str(folder / "test")}
    assert len(list(cache.glob("*.npy"))) == 3
