"""Finding, listing and decoding image files for the file-based datamodules.

Everything here is plain Python/PIL/torch so that the ImageFolder, list-file and Flowers102
LightningDataModules can share it:

* `scan_class_folders` reads an ImageFolder tree (`split_dir/<class>/**/<image>`);
* `read_list_file` reads PaddleClas-style list files (`relative/path.jpg 3`);
* `read_class_names` reads class-name files (`0 tench` id maps or one name per line);
* `load_rgb`, `resize_center_crop` and `decode_to_tensor` turn files into uint8 tensors, the
  last one for whole splits that fit in memory;
* `ImageFileDataset` + `collate_skip_none` stream splits that do not fit through a DataLoader.

Files that cannot be used are not fatal: they come back as `SkippedFile` entries (or are logged,
in DataLoader workers) and `write_skipped` keeps a list of them in the run directory. Mistakes a
user can fix (a missing folder, a malformed list file) raise `AutoclsError` with one sentence.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate
from torchvision.transforms.v2.functional import pil_to_tensor

from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
"""Lower-case suffixes treated as images; matching is case-insensitive (`IMG_01.JPG` counts)."""

# Folders that archivers and NAS boxes drop next to real data; they are never classes.
_IGNORED_DIR_NAMES = frozenset({"__MACOSX", "@eaDir"})

# Background that transparent pixels are composited onto: white is what image viewers show and
# what most web-scraped datasets (product photos, logos) implicitly assume.
_BACKGROUND = (255, 255, 255)

# Modes with an alpha band (checked by name: "LAB" has an "A" band that is not alpha).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# Images per task submitted to the decoding pool: large enough that future bookkeeping is
# negligible next to decoding, small enough to balance load across threads.
_DECODE_CHUNK = 64


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of a dataset, and why (e.g. "not an image file", "missing")."""

    path: str
    reason: str


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True if `path` has one of `IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_DIR_NAMES


# --------------------------------------------------------------------------------------------
# Finding samples
# --------------------------------------------------------------------------------------------


def _walk_class_folder(class_dir: Path) -> tuple[list[str], list[SkippedFile]]:
    """All image files below `class_dir` (recursively, sorted, hidden entries ignored) and the
    non-image files found on the way."""
    images: list[str] = []
    skipped: list[SkippedFile] = []
    # followlinks: class folders are often symlinks into a shared data store.
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        # Sorting (and pruning) in place makes os.walk descend in a deterministic order.
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            path = os.path.join(dirpath, name)
            if is_image_file(name):
                images.append(path)
            else:
                skipped.append(SkippedFile(path, "not an image file"))
    return images, skipped


def scan_class_folders(
    split_dir: str | os.PathLike[str], class_names: Sequence[str] | None = None
) -> tuple[list[tuple[str, int]], list[str], list[SkippedFile]]:
    """Find the images of one split in ImageFolder layout, `split_dir/<class>/**/<image>`.

    Args:
        split_dir: The split folder (e.g. `data/train`); each visible sub-folder is a class.
        class_names: The training split's classes, when scanning val/test: labels then index
            into this list, a folder that is not in it is an error, and a class with no folder
            here is fine (a small val split may lack rare classes).

    Returns:
        `(samples, classes, skipped)`: `(path, label)` pairs sorted by class then path, the class
        names (sorted folder names, or `class_names` as given), and non-image files found.

    Raises:
        AutoclsError: `split_dir` is missing or has no class folders, a class folder holds no
            images, or a folder is not one of `class_names`.
    """
    root = Path(split_dir)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise AutoclsError(
            f"Image folder {root} {what}; set data.data_dir to a folder holding train/<class>/ "
            "images (and optionally val/, test/)."
        )

    skipped: list[SkippedFile] = []
    folders: list[str] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if _is_hidden(entry.name):
            continue
        if entry.is_dir():  # follows symlinks
            folders.append(entry.name)
        else:
            # Stray files next to the class folders (README, labels.csv) belong to no class.
            skipped.append(SkippedFile(entry.path, "not in a class folder"))
    if not folders:
        raise AutoclsError(
            f"Image folder {root} has no class sub-folders; put each class's images in a "
            f"sub-folder named after the class, like {root / 'cat' / '0001.jpg'}."
        )

    if class_names is None:
        classes = folders
    else:
        classes = list(class_names)
        known = set(classes)
        for folder in folders:
            if folder not in known:
                raise AutoclsError(
                    f"Class folder {root / folder} is not one of the {len(classes)} training "
                    f"classes; rename or remove it so that {root} uses the training split's "
                    "class names."
                )
    label_of = {name: i for i, name in enumerate(classes)}

    samples: list[tuple[str, int]] = []
    for folder in folders:
        class_dir = root / folder
        images, not_images = _walk_class_folder(class_dir)
        skipped.extend(not_images)
        if not images:
            raise AutoclsError(
                f"Class folder {class_dir} has no image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images to it or remove it."
            )
        label = label_of[folder]
        samples.extend((path, label) for path in images)
    return samples, classes, skipped


def read_list_file(
    list_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    delimiter: str = " ",
) -> tuple[list[tuple[str, int]], list[SkippedFile]]:
    """Read a PaddleClas-style list file with one `<path><delimiter><label>` per line.

    Paths are relative to `root` (absolute paths are kept as they are). The label is the field
    after the LAST delimiter, so with the default space delimiter paths may contain spaces.
    Blank lines and lines starting with `#` are ignored.

    Returns:
        `(samples, skipped)`: `(path, label)` pairs in file order for files that exist, and a
        `SkippedFile(path, "missing")` for each listed file that does not.

    Raises:
        AutoclsError: The list file is missing or empty, a line has no label or a label that is
            not a non-negative integer (the message names the line), or no listed file exists.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise AutoclsError(
            f"List file {list_path} does not exist; point the datamodule's list file setting at "
            f"a text file with one '<image path>{delimiter}<label>' per line."
        )
    if not delimiter:
        raise AutoclsError("The list-file delimiter is empty; set it to ' ', ',' or a tab.")

    samples: list[tuple[str, int]] = []
    skipped: list[SkippedFile] = []
    # utf-8-sig: list files written on Windows often start with a byte-order mark.
    with open(list_path, encoding="utf-8-sig") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            rel_path, sep, label_text = line.rpartition(delimiter)
            rel_path, label_text = rel_path.strip(), label_text.strip()
            where = f"line {line_no} of {list_path}"
            if not sep or not rel_path:
                raise AutoclsError(
                    f"{where} ({line!r}) is not '<image path>{delimiter}<label>'; add the integer "
                    f"label after the path or set the delimiter (currently {delimiter!r})."
                )
            try:
                label = int(label_text)
            except ValueError:
                label = -1
            if label < 0:
                raise AutoclsError(
                    f"{where} has label {label_text!r}, which is not a non-negative integer; "
                    "write class ids 0..K-1 as the last field of each line."
                )
            path = os.path.join(root, rel_path)  # an absolute rel_path wins, as intended
            if os.path.isfile(path):
                samples.append((path, label))
            else:
                skipped.append(SkippedFile(path, "missing"))

    if not samples:
        if not skipped:
            raise AutoclsError(
                f"List file {list_path} lists no images; add '<image path>{delimiter}<label>' "
                "lines to it."
            )
        raise AutoclsError(
            f"None of the {len(skipped)} files listed in {list_path} exist under root {root} "
            f"(first: {skipped[0].path}); check that root is the folder the listed paths are "
            "relative to."
        )
    return samples, skipped


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Read class names, index = label, from either supported format.

    * PaddleClas class_id_map: `<id> <name>` per line (whitespace-separated, the name may
      contain spaces), ids exactly 0..K-1 in any order.
    * Plain: one name per line, in label order.

    A file is read as an id map only if every non-blank line starts with an integer followed by
    a name; otherwise each line is a name. Blank lines are ignored.

    Raises:
        AutoclsError: The file is missing or empty, or an id map's ids are not 0..K-1.
    """
    path = Path(path)
    if not path.is_file():
        raise AutoclsError(
            f"Class-name file {path} does not exist; point it at a file with one class name "
            "per line or '<id> <name>' lines."
        )
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if not lines:
        raise AutoclsError(f"Class-name file {path} is empty; write one class name per line.")

    pairs = [line.split(maxsplit=1) for line in lines]
    if not all(len(p) == 2 and _is_int(p[0]) for p in pairs):
        return lines

    by_id: dict[int, str] = {}
    for class_id, name in ((int(p[0]), p[1].strip()) for p in pairs):
        if class_id in by_id:
            raise AutoclsError(
                f"Class-name file {path} lists id {class_id} twice; give each class one "
                "'<id> <name>' line."
            )
        by_id[class_id] = name
    if sorted(by_id) != list(range(len(by_id))):
        missing = sorted(set(range(len(by_id))) - set(by_id))
        raise AutoclsError(
            f"Class-name file {path} has ids that are not 0..{len(by_id) - 1} (missing "
            f"{missing[:5]}); number the classes consecutively from 0."
        )
    return [by_id[i] for i in range(len(by_id))]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float grayscale image to 8-bit "L".

    PIL's own conversion clips everything above 255 to white, which turns a normal 16-bit PNG
    into a blank image; scale by the range the mode implies instead.
    """
    if img.mode.startswith("I;16"):
        scale = 1 / 257  # 65535 -> 255
    else:  # "I" (32-bit int) or "F": no fixed range, so infer it from the data
        low, high = img.getextrema()
        if img.mode == "F" and 0 <= low and high <= 1.0:
            scale = 255.0
        elif high <= 255:
            scale = 1.0
        elif high <= 65535:
            scale = 1 / 257
        else:
            scale = 255 / high
    base = img if img.mode == "F" else img.convert("I")
    # point() on I/F images applies `x * scale + offset`; +0.5 rounds instead of truncating.
    return base.point(lambda x: x * scale + 0.5).convert("L")


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as an upright, fully decoded 8-bit RGB image.

    EXIF orientation is applied; transparent pixels (RGBA, LA, palette or tRNS transparency) are
    composited onto white; 16-bit and other high-bit-depth grayscale is rescaled to 8 bits.

    Raises:
        OSError, ValueError, ...: Whatever PIL raises for missing, corrupt or truncated files
            (truncated files are NOT padded with gray); callers decide whether to skip them.
    """
    with Image.open(path) as img:
        # Decode now, inside the `with`, so that corrupt data raises here rather than later
        # and the file handle is closed when we return.
        img.load()
        img = ImageOps.exif_transpose(img)

    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _high_bit_depth_to_l(img)
        mode = img.mode

    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # convert() always returns a new image, so the result never refers to the closed file.
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 1.0) -> Image.Image:
    """The standard eval transform: resize the shorter side to `round(size / crop_pct)`
    (bilinear; PIL antialiases when shrinking), then cut the central `size` x `size` square."""
    _check_size(size, crop_pct)
    short = round(size / crop_pct)
    width, height = img.size
    if width <= height:
        new_size = (short, max(short, round(height * short / width)))
    else:
        new_size = (max(short, round(width * short / height)), short)
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BILINEAR)
    # Same rounding as torchvision's center_crop, so the two paths cut identical pixels.
    left = round((new_size[0] - size) / 2.0)
    top = round((new_size[1] - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def _check_size(size: int, crop_pct: float) -> None:
    if not isinstance(size, int) or size <= 0:
        raise AutoclsError(f"Image size {size!r} is not a positive integer; set it to e.g. 224.")
    if not 0 < crop_pct <= 1:
        raise AutoclsError(
            f"crop_pct {crop_pct!r} is outside (0, 1]; use 1.0 for resize-then-crop or e.g. 0.875 "
            "to resize to size/0.875 first."
        )


def _short_error(exc: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters, for skip reports."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_to_tensor(
    samples: Sequence[tuple[str, int]],
    size: int,
    crop_pct: float = 1.0,
    num_threads: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[SkippedFile]]:
    """Decode a whole split into memory: `load_rgb` + `resize_center_crop` for every sample.

    Decoding runs on a thread pool (`num_threads`, or `os.cpu_count()` when 0); PIL releases the
    GIL while decoding and resizing, so threads scale without the cost of processes. Results are
    written straight into one preallocated tensor, so peak memory is the output itself.

    Returns:
        `(images, labels, skipped)`: uint8 `(N_ok, 3, size, size)`, int64 `(N_ok,)` in input
        order of the samples that decoded, and `SkippedFile(path, "unreadable: ...")` for the
        rest. When files were skipped, `images` is a view of the first `N_ok` rows of the
        preallocated buffer (the skipped rows' memory is not returned to the allocator).

    Raises:
        AutoclsError: No sample could be decoded, or `size`/`crop_pct` are invalid.
    """
    _check_size(size, crop_pct)
    n = len(samples)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    errors: list[str | None] = [None] * n

    def decode_range(start: int, stop: int) -> None:
        for i in range(start, stop):
            try:
                img = resize_center_crop(load_rgb(samples[i][0]), size, crop_pct)
                images[i].copy_(pil_to_tensor(img))
            # PIL signals bad files with many types (OSError, ValueError, SyntaxError,
            # DecompressionBombError, struct.error...); any of them just means "skip this file".
            except Exception as exc:  # noqa: BLE001
                errors[i] = _short_error(exc)

    workers = num_threads if num_threads > 0 else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        futures = [
            pool.submit(decode_range, start, min(start + _DECODE_CHUNK, n))
            for start in range(0, n, _DECODE_CHUNK)
        ]
        for future in futures:
            future.result()  # re-raise anything that escaped (a bug, not a bad file)

    skipped = [
        SkippedFile(samples[i][0], f"unreadable: {err}") for i, err in enumerate(errors) if err
    ]
    if not skipped:
        return images, labels, skipped
    if len(skipped) == n:
        raise AutoclsError(
            f"None of the {n} images could be decoded (first: {skipped[0].path}, "
            f"{skipped[0].reason}); check that the data path points at valid image files."
        )

    # Compact the good rows to the front in place; row i only ever moves to j <= i, so walking
    # forward never overwrites a row that is still to be moved, and no second buffer is needed.
    keep = [i for i, err in enumerate(errors) if err is None]
    for j, i in enumerate(keep):
        if i != j:
            images[j].copy_(images[i])
    log.warning("Skipped %d of %d images that could not be decoded.", len(skipped), n)
    return images[: len(keep)], labels[keep], skipped


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class ImageFileDataset(Dataset):
    """Map-style dataset over `(path, label)` samples that decodes on access.

    Items are `(uint8 CHW tensor, label)`. Use it with `collate_skip_none`: an unreadable file
    yields None (with a warning logged once per file and worker process) instead of crashing a
    DataLoader worker mid-epoch.

    Args:
        samples: `(path, label)` pairs, e.g. from `scan_class_folders` or `read_list_file`.
        transform: Callable on the RGB PIL image returning a uint8 CHW tensor (e.g. a
            torchvision.transforms.v2 pipeline); if None, `resize_center_crop(img, size)`.
        size: Output side for the default transform; required when `transform` is None.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        size: int | None = None,
    ) -> None:
        if transform is None:
            if size is None:
                raise ValueError("ImageFileDataset needs either `transform` or `size`.")
            _check_size(size, 1.0)
        self.samples = list(samples)
        self.transform = transform
        self.size = size
        # Per process: each DataLoader worker has its own copy, so a bad file is reported
        # once per worker rather than once per epoch.
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except Exception as exc:  # noqa: BLE001 - see decode_to_tensor
            if path not in self._warned:
                self._warned.add(path)
                log.warning("Skipping unreadable image %s (%s).", path, _short_error(exc))
            return None
        if self.transform is not None:
            return self.transform(img), label
        return pil_to_tensor(resize_center_crop(img, self.size)), label


def collate_skip_none(batch: list[Any]) -> Any:
    """`default_collate` without the None items that `ImageFileDataset` returns for unreadable
    files; returns None if the whole batch was unreadable (skip that step)."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return default_collate(batch)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def write_skipped(skipped: Sequence[SkippedFile], path: str | os.PathLike[str]) -> None:
    """Write `skipped` as a TSV with a `path<TAB>reason` header; nothing is written (no file is
    created) when the list is empty."""
    if not skipped:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(text: str) -> str:
        # A tab or newline inside a field would break the one-row-per-file format.
        return " ".join(text.split("\t")).replace("\r", " ").replace("\n", " ")

    with open(path, "w", encoding="utf-8") as f:
        f.write("path\treason\n")
        f.writelines(f"{clean(item.path)}\t{clean(item.reason)}\n" for item in skipped)
