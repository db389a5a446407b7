"""Tests for src/datamodules/image_files.py: scanning, list files, decoding, skipping."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_jpg import CIFAR10_CLASSES, cifar_jpg_archive, extract_cifar_jpg_subset
from PIL import Image

from src.datamodules.image_files import (
    IMAGE_EXTENSIONS,
    ImageFileDataset,
    SkippedFile,
    collate_skip_none,
    decode_to_tensor,
    load_rgb,
    read_class_names,
    read_list_file,
    resize_center_crop,
    scan_class_folders,
    write_skipped,
)
from src.utils.errors import AutoclsError

# --------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------


def save_rgb(path: Path, size=(20, 12), color=(200, 30, 40), fmt=None) -> Path:
    """Write a solid-colour RGB image (format from the suffix unless `fmt` is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def error_of(excinfo: pytest.ExceptionInfo) -> str:
    """The error sentence, checked to be a single line as the entry points print it."""
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture
def mode_images(tmp_path: Path) -> dict[str, Path]:
    """One 20x12 (w x h) file per awkward PIL mode/format."""
    d = tmp_path / "modes"
    d.mkdir()
    paths = {"rgb_jpg": save_rgb(d / "rgb.jpg")}

    Image.new("L", (20, 12), 90).save(d / "gray.png")
    paths["gray_png"] = d / "gray.png"

    rgba = Image.new("RGBA", (20, 12), (0, 0, 0, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> must become white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid gray
    rgba.save(d / "rgba.png")
    paths["rgba_png"] = d / "rgba.png"

    pal = Image.new("P", (20, 12), 1)
    pal.putpalette([0, 0, 255] + [255, 0, 0] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 0)  # palette index 0 is declared transparent below
    pal.save(d / "palette.png", transparency=0)
    paths["palette_png"] = d / "palette.png"

    # 16-bit gray: 16384/65535 is a quarter of full scale, i.e. 64 in 8 bits.
    Image.fromarray(np.full((12, 20), 16384, dtype=np.uint16)).save(d / "gray16.png")
    paths["gray16_png"] = d / "gray16.png"

    Image.new("CMYK", (20, 12), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    paths["cmyk_jpg"] = d / "cmyk.jpg"

    Image.new("1", (20, 12), 1).save(d / "bilevel.png")
    paths["bilevel_png"] = d / "bilevel.png"

    Image.new("LA", (20, 12), (0, 0)).save(d / "la.png")  # fully transparent
    paths["la_png"] = d / "la.png"
    return paths


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    """train/{cat,dog}/ with nested folders, an upper-case suffix, hidden and non-image files."""
    root = tmp_path / "data" / "train"
    save_rgb(root / "cat" / "b.jpg")
    save_rgb(root / "cat" / "a.png")
    save_rgb(root / "cat" / "sub" / "c.JPG", fmt="JPEG")
    save_rgb(root / "cat" / ".hidden.jpg")
    save_rgb(root / "cat" / ".cache" / "d.jpg")
    (root / "cat" / "notes.txt").write_text("not an image")
    save_rgb(root / "dog" / "z.jpeg")
    save_rgb(root / ".git" / "x.jpg")  # hidden folder: not a class
    return root


def broken_files(d: Path) -> dict[str, Path]:
    """A random-bytes .jpg, a JPEG cut in half, and an empty .png."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (d / "random.jpg").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    # Noise does not compress, so the cut lands in the middle of the scan data.
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "full.jpg", quality=95)
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "full.jpg").unlink()
    (d / "empty.png").write_bytes(b"")
    return {"random": d / "random.jpg", "truncated": d / "truncated.jpg", "empty": d / "empty.png"}


# --------------------------------------------------------------------------------------------
# load_rgb / resize_center_crop
# --------------------------------------------------------------------------------------------


def test_image_extensions_cover_common_formats():
    assert {".jpg", ".jpeg", ".png", ".webp", ".tiff", ".pgm"} <= IMAGE_EXTENSIONS


@pytest.mark.parametrize(
    "name",
    ["rgb_jpg", "gray_png", "rgba_png", "palette_png", "gray16_png", "cmyk_jpg", "bilevel_png",
     "la_png"],
)
def test_load_rgb_converts_every_mode(mode_images, name):
    img = load_rgb(mode_images[name])
    assert img.mode == "RGB"
    assert img.size == (20, 12)


def test_load_rgb_composites_alpha_on_white(mode_images):
    rgba = load_rgb(mode_images["rgba_png"])
    assert rgba.getpixel((0, 0)) == (255, 255, 255)
    assert all(120 <= c <= 135 for c in rgba.getpixel((1, 0)))
    assert rgba.getpixel((5, 5)) == (0, 0, 0)

    palette = load_rgb(mode_images["palette_png"])
    assert palette.getpixel((0, 0)) == (255, 255, 255)
    assert palette.getpixel((5, 5)) == (255, 0, 0)

    assert load_rgb(mode_images["la_png"]).getpixel((3, 3)) == (255, 255, 255)


def test_load_rgb_pixel_values(mode_images):
    assert load_rgb(mode_images["gray_png"]).getpixel((3, 3)) == (90, 90, 90)
    # Scaled, not clipped: naive PIL conversion would give 255.
    assert load_rgb(mode_images["gray16_png"]).getpixel((3, 3)) == (64, 64, 64)
    r, g, b = load_rgb(mode_images["cmyk_jpg"]).getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60  # C=0, M=Y=full -> red
    assert load_rgb(mode_images["bilevel_png"]).getpixel((3, 3)) == (255, 255, 255)


def test_load_rgb_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


@pytest.mark.parametrize("kind", ["random", "truncated", "empty"])
def test_load_rgb_raises_on_broken_files(tmp_path, kind):
    with pytest.raises(Exception):
        load_rgb(broken_files(tmp_path)[kind])


@pytest.mark.parametrize(
    ("in_size", "size", "crop_pct", "resized"),
    [
        ((300, 200), 64, 1.0, (96, 64)),   # landscape
        ((200, 300), 64, 1.0, (64, 96)),   # portrait
        ((50, 50), 64, 1.0, (64, 64)),     # upscale
        ((400, 200), 224, 0.875, (512, 256)),
    ],
)
def test_resize_center_crop(in_size, size, crop_pct, resized):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (in_size[1], in_size[0], 3), dtype=np.uint8))
    out = resize_center_crop(img, size, crop_pct)
    assert out.size == (size, size)
    # Same pixels as resizing the shorter side to `resized` and cutting the centre by hand.
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    expected = img.resize(resized, Image.Resampling.BILINEAR).crop(
        (left, top, left + size, top + size)
    )
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_resize_center_crop_rejects_bad_crop_pct():
    with pytest.raises(AutoclsError) as excinfo:
        resize_center_crop(Image.new("RGB", (10, 10)), 8, 1.5)
    assert "crop_pct" in error_of(excinfo)


# --------------------------------------------------------------------------------------------
# scan_class_folders
# --------------------------------------------------------------------------------------------


def test_scan_class_folders(class_tree):
    samples, classes, skipped = scan_class_folders(class_tree)
    assert classes == ["cat", "dog"]
    rel = [(str(Path(p).relative_to(class_tree)), y) for p, y in samples]
    assert rel == [("cat/a.png", 0), ("cat/b.jpg", 0), ("cat/sub/c.JPG", 0), ("dog/z.jpeg", 1)]
    assert skipped == [SkippedFile(str(class_tree / "cat" / "notes.txt"), "not an image file")]
    assert scan_class_folders(class_tree)[0] == samples  # deterministic


def test_scan_val_uses_train_classes(class_tree):
    _, classes, _ = scan_class_folders(class_tree)
    val = class_tree.parent / "val"
    save_rgb(val / "dog" / "1.jpg")  # no cat folder in val: fine
    samples, val_classes, _ = scan_class_folders(val, class_names=classes)
    assert val_classes == ["cat", "dog"]
    assert [y for _, y in samples] == [1]  # label of dog in the *train* classes


def test_scan_val_class_not_in_train(class_tree):
    val = class_tree.parent / "val"
    save_rgb(val / "dog" / "1.jpg")
    save_rgb(val / "horse" / "1.jpg")
    with pytest.raises(AutoclsError) as excinfo:
        scan_class_folders(val, class_names=["cat", "dog"])
    assert str(val / "horse") in error_of(excinfo)


def test_scan_missing_dir(tmp_path):
    with pytest.raises(AutoclsError) as excinfo:
        scan_class_folders(tmp_path / "nope")
    message = error_of(excinfo)
    assert str(tmp_path / "nope") in message and "does not exist" in message


def test_scan_dir_without_class_folders(tmp_path):
    save_rgb(tmp_path / "flat" / "img.jpg")  # images directly in the split folder
    with pytest.raises(AutoclsError) as excinfo:
        scan_class_folders(tmp_path / "flat")
    message = error_of(excinfo)
    assert str(tmp_path / "flat") in message and "class sub-folders" in message


def test_scan_class_folder_without_images(class_tree):
    (class_tree / "empty_class").mkdir()
    (class_tree / "empty_class" / "readme.md").write_text("x")
    with pytest.raises(AutoclsError) as excinfo:
        scan_class_folders(class_tree)
    message = error_of(excinfo)
    assert str(class_tree / "empty_class") in message and "remove it" in message


# --------------------------------------------------------------------------------------------
# decode_to_tensor / ImageFileDataset
# --------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_split(tmp_path) -> tuple[list[tuple[str, int]], dict[str, Path], list[SkippedFile]]:
    """Scan of a split where good images of distinct colours are interleaved with broken ones."""
    root = tmp_path / "mixed"
    save_rgb(root / "a" / "0_good.jpg", size=(40, 30), color=(250, 0, 0))
    save_rgb(root / "a" / "5_good.png", size=(30, 40), color=(0, 250, 0))
    save_rgb(root / "b" / "z_good.png", size=(16, 16), color=(0, 0, 250))
    broken = broken_files(root / "b")
    (root / "b" / "notes.txt").write_text("hello")
    samples, _, skipped = scan_class_folders(root)
    return samples, broken, skipped


def test_decode_to_tensor_skips_broken_files(mixed_split):
    samples, broken, scan_skipped = mixed_split
    assert [s.reason for s in scan_skipped] == ["not an image file"]
    assert Path(scan_skipped[0].path).name == "notes.txt"

    images, labels, skipped = decode_to_tensor(samples, size=16, num_threads=2)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1] and labels.dtype == torch.int64
    # Order is preserved: red, green, blue (the blue one came after the broken files, so it
    # had to be moved down). The PNGs are lossless, so their pixels are exact.
    assert images[0, 0].float().mean() > 200 and images[0, 1:].float().mean() < 30
    solid = torch.empty(3, 16, 16, dtype=torch.uint8)
    assert torch.equal(images[1], solid.copy_(torch.tensor([0, 250, 0])[:, None, None]))
    assert torch.equal(images[2], solid.copy_(torch.tensor([0, 0, 250])[:, None, None]))
    assert {s.path for s in skipped} == {str(p) for p in broken.values()}
    assert all(s.reason.startswith("unreadable: ") and len(s.reason) > 12 for s in skipped)


def test_decode_to_tensor_matches_single_image_path(mixed_split):
    samples, _, _ = mixed_split
    good = [s for s in samples if "good" in s[0]]
    images, _, skipped = decode_to_tensor(good, size=12, crop_pct=0.875, num_threads=1)
    assert skipped == []
    expected = np.array(resize_center_crop(load_rgb(good[1][0]), 12, 0.875))
    assert torch.equal(images[1], torch.from_numpy(expected).permute(2, 0, 1))


def test_decode_to_tensor_all_broken(tmp_path):
    broken = broken_files(tmp_path)
    with pytest.raises(AutoclsError) as excinfo:
        decode_to_tensor([(str(p), 0) for p in broken.values()], size=8)
    assert "None of the 3 images" in error_of(excinfo)


def test_image_file_dataset_and_collate(mixed_split, caplog):
    samples, broken, _ = mixed_split
    ds = ImageFileDataset(samples, size=8)
    with caplog.at_level(logging.WARNING, logger="src.datamodules.image_files"):
        items = [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]
    bad = [i for i, (p, _) in enumerate(samples) if p in {str(b) for b in broken.values()}]
    assert [i for i, item in enumerate(items[: len(ds)]) if item is None] == bad
    # One warning per bad file even though every file was read twice.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(broken)

    batch = collate_skip_none(items[: len(ds)])
    images, labels = batch
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1]
    assert collate_skip_none([None, None]) is None


def test_image_file_dataset_transform(mixed_split):
    samples, _, _ = mixed_split

    def transform(img):
        return torch.zeros(3, 5, 7, dtype=torch.uint8) + img.size[0] % 256

    image, label = ImageFileDataset(samples[:1], transform=transform)[0]
    assert image.shape == (3, 5, 7) and int(image[0, 0, 0]) == 40 and label == 0
    with pytest.raises(ValueError):
        ImageFileDataset(samples)


def test_image_file_dataset_in_dataloader_workers(mixed_split):
    samples, _, _ = mixed_split
    loader = torch.utils.data.DataLoader(
        ImageFileDataset(samples, size=8),
        batch_size=2,
        num_workers=1,
        collate_fn=collate_skip_none,
    )
    batches = [b for b in loader if b is not None]
    assert sum(len(b[1]) for b in batches) == 3


def test_write_skipped(tmp_path):
    out = tmp_path / "run" / "skipped.tsv"
    write_skipped([], out)
    assert not out.exists()
    skipped = [SkippedFile("/a b/x.jpg", "unreadable: bad\tthing"), SkippedFile("y", "missing")]
    write_skipped(skipped, out)
    lines = out.read_text().splitlines()
    assert lines == ["path\treason", "/a b/x.jpg\tunreadable: bad thing", "y\tmissing"]


# --------------------------------------------------------------------------------------------
# List files and class names
# --------------------------------------------------------------------------------------------


def test_read_list_file_space_delimiter_with_spaces_in_paths(tmp_path):
    save_rgb(tmp_path / "my images" / "a cat.jpg")
    save_rgb(tmp_path / "b.jpg")
    absolute = save_rgb(tmp_path / "elsewhere" / "c.png")
    (tmp_path / "train.txt").write_text(
        "# comment\n"
        "my images/a cat.jpg 3\n"
        "\n"
        "b.jpg   0  \n"
        f"{absolute} 7\n"
        "gone.jpg 1\n"
    )
    samples, skipped = read_list_file(tmp_path / "train.txt", root=tmp_path)
    assert samples == [
        (str(tmp_path / "my images" / "a cat.jpg"), 3),
        (str(tmp_path / "b.jpg"), 0),
        (str(absolute), 7),
    ]
    assert skipped == [SkippedFile(str(tmp_path / "gone.jpg"), "missing")]


def test_read_list_file_comma_delimiter(tmp_path):
    save_rgb(tmp_path / "imgs" / "x y.jpg")
    (tmp_path / "val.csv").write_text("imgs/x y.jpg,2\n")
    samples, skipped = read_list_file(tmp_path / "val.csv", root=tmp_path, delimiter=",")
    assert samples == [(str(tmp_path / "imgs" / "x y.jpg"), 2)] and skipped == []


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [("b.jpg cat", "'cat'"), ("b.jpg -1", "'-1'"), ("b.jpg 1.5", "'1.5'"), ("b.jpg", "label")],
)
def test_read_list_file_bad_lines(tmp_path, bad_line, expected):
    save_rgb(tmp_path / "a.jpg")
    (tmp_path / "list.txt").write_text(f"a.jpg 0\n\n{bad_line}\n")
    with pytest.raises(AutoclsError) as excinfo:
        read_list_file(tmp_path / "list.txt", root=tmp_path)
    message = error_of(excinfo)
    assert f"line 3 of {tmp_path / 'list.txt'}" in message and expected in message


def test_read_list_file_missing_and_all_missing(tmp_path):
    with pytest.raises(AutoclsError) as excinfo:
        read_list_file(tmp_path / "nope.txt", root=tmp_path)
    assert str(tmp_path / "nope.txt") in error_of(excinfo)

    (tmp_path / "list.txt").write_text("a.jpg 0\nb.jpg 1\n")
    with pytest.raises(AutoclsError) as excinfo:
        read_list_file(tmp_path / "list.txt", root=tmp_path / "wrong_root")
    message = error_of(excinfo)
    assert "None of the 2 files" in message and "root" in message
    assert str(tmp_path / "list.txt") in message


def test_read_class_names_both_formats(tmp_path):
    (tmp_path / "id_map.txt").write_text("1 goldfish\n0 tench\n\n2 great white shark\n")
    assert read_class_names(tmp_path / "id_map.txt") == ["tench", "goldfish", "great white shark"]

    (tmp_path / "names.txt").write_text("cat\ndog\nsea lion\n")
    assert read_class_names(tmp_path / "names.txt") == ["cat", "dog", "sea lion"]


def test_read_class_names_errors(tmp_path):
    with pytest.raises(AutoclsError) as excinfo:
        read_class_names(tmp_path / "missing.txt")
    assert str(tmp_path / "missing.txt") in error_of(excinfo)

    (tmp_path / "gap.txt").write_text("0 a\n2 c\n")
    with pytest.raises(AutoclsError) as excinfo:
        read_class_names(tmp_path / "gap.txt")
    assert "[1]" in error_of(excinfo)


# --------------------------------------------------------------------------------------------
# Real data: CIFAR-10 JPEGs
# --------------------------------------------------------------------------------------------

PER_CLASS = 20


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory) -> Path:
    """train/ and test/ with the first 20 images per class from the shared archive."""
    archive = cifar_jpg_archive()
    if archive is None:
        pytest.skip(
            "CIFAR-10 JPEG archive not found; set AUTOCLS_CIFAR_JPG to cifar10-jpg.tar.gz "
            "to run the real-data tests."
        )
    return extract_cifar_jpg_subset(archive, tmp_path_factory.mktemp("cifar"), PER_CLASS)


def test_cifar_scan_and_decode(cifar_subset):
    samples, classes, skipped = scan_class_folders(cifar_subset / "train")
    assert classes == list(CIFAR10_CLASSES) and skipped == []
    assert len(samples) == 10 * PER_CLASS
    images, labels, bad = decode_to_tensor(samples, size=32)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8 and bad == []
    assert torch.equal(labels, torch.arange(10).repeat_interleave(PER_CLASS))
    # Real photos, not blank buffers: plenty of distinct values per image.
    assert all(len(torch.unique(img)) > 50 for img in images[::37])

    test_samples, test_classes, _ = scan_class_folders(cifar_subset / "test", class_names=classes)
    assert test_classes == classes and len(test_samples) == 10 * PER_CLASS


def test_cifar_list_file_roundtrip(cifar_subset, tmp_path):
    samples, classes, _ = scan_class_folders(cifar_subset / "train")
    lines = [f"{Path(p).relative_to(cifar_subset).as_posix()} {y}" for p, y in samples]
    (tmp_path / "train_list.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "labels.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes)))

    listed, skipped = read_list_file(tmp_path / "train_list.txt", root=cifar_subset)
    assert skipped == []
    assert [(str(Path(p)), y) for p, y in listed] == samples
    assert read_class_names(tmp_path / "labels.txt") == classes
