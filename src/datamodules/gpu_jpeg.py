"""Batch JPEG decoding on the GPU for streamed folders (`data.gpu_decode=true`).

Decoding is what limits a DataLoader over ImageNet-sized JPEGs: a CPU core decodes a few hundred
images per second. With this option the workers only read each file's bytes; the batch of encoded
JPEGs stays on the host (nvJPEG reads host memory) and `decode_batch` decodes it in one call of
`torchvision.io.decode_jpeg(..., device="cuda")` inside `on_after_batch_transfer`, then resizes each
image on the device (shorter side to size / crop_pct, bilinear with antialiasing, centre square, as
the CPU path). Training batches are then augmented on the device, as in-memory data is.

What nvJPEG cannot do is done by the workers, which decode those files with PIL and pass pixels
instead of bytes: non-JPEG files, CMYK/YCCK JPEGs, and JPEGs with an EXIF orientation to apply
(nvJPEG ignores it). A file that fails to decode is skipped with a logged warning, as on the CPU path.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec; its warning is silenced here
(the function still works, and the option can move to TorchCodec's GPU decoder when that is a
dependency).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import Dataset, default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

from src.datamodules.image_files import _short_error, load_rgb
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112


class EncodedBatch:
    """A batch of images as the workers deliver them: 1-D uint8 tensors of JPEG bytes, or (3, H, W)
    uint8 tensors the workers decoded. Not a tensor or a container Lightning knows, so moving the
    batch to the device leaves it on the host, where nvJPEG wants its input."""

    def __init__(self, items: Sequence[torch.Tensor]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)


def _nvjpeg_can_decode(data: bytes) -> bool:
    """A baseline RGB or grayscale JPEG that needs no EXIF rotation (PIL reads only the header)."""
    if not data.startswith(b"\xff\xd8"):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(_EXIF_ORIENTATION, 1) == 1
    except Exception:  # noqa: BLE001 - any unreadable header: let PIL decode it (and report it) below
        return False


class EncodedImageDataset(Dataset):
    """Items `(JPEG bytes as a 1-D uint8 tensor or decoded (3, H, W) uint8 pixels, label)`, or None
    for an unreadable file (warned once per file and worker); batch them with `collate_encoded`."""

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = list(samples)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
            if _nvjpeg_can_decode(data):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), label
            return pil_to_tensor(load_rgb(io.BytesIO(data))), label
        except Exception as exc:  # noqa: BLE001 - as ImageFileDataset: skip, do not crash the worker
            if path not in self._warned:
                self._warned.add(path)
                log.warning("Skipping unreadable image %s (%s).", path, _short_error(exc))
            return None


def collate_encoded(batch: list) -> tuple[EncodedBatch, torch.Tensor] | None:
    """`(EncodedBatch, labels)` without the unreadable items; None if none is left (skip the step)."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return EncodedBatch([item for item, _ in batch]), default_collate([label for _, label in batch])


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG byte tensors on `device` in one call; when that fails (a corrupt file fails the whole
    call), one by one, and with PIL where `device` cannot (e.g. a truncated file, which PIL also
    rejects): None for each file that nothing can decode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            return [_decode_one(item, device) for item in data]


def _decode_one(item: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(item, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return pil_to_tensor(load_rgb(io.BytesIO(item.numpy().tobytes()))).to(device)
    except Exception as exc:  # noqa: BLE001 - PIL's many error types all mean "skip this file"
        log.warning("Skipping a JPEG that could not be decoded (%s).", _short_error(exc))
        return None


def resize_center_crop_batch(images: list[torch.Tensor], size: int, crop_pct: float) -> torch.Tensor:
    """uint8 (3, H, W) images of any sizes -> uint8 (B, 3, size, size): the shorter side resized to
    round(size / crop_pct) (bilinear, antialiased, as PIL), then the central square. Images of equal
    size are resized together."""
    short = round(size / crop_pct)
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape[-2:]), []).append(i)
    for (h, w), idx in by_shape.items():
        group = torch.stack([images[i] for i in idx])
        if w <= h:  # the rounding of `image_files.resize_center_crop`, so both paths cut the same pixels
            new_h, new_w = max(short, round(h * short / w)), short
        else:
            new_h, new_w = short, max(short, round(w * short / h))
        if (new_h, new_w) != (h, w):
            resized = F.interpolate(group.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
            group = resized.round_().clamp_(0, 255).to(torch.uint8)
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
        out[idx] = group[..., top : top + size, left : left + size]
    return out


def decode_batch(batch: EncodedBatch, size: int, crop_pct: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode an `EncodedBatch` on `device` into uint8 (B', 3, size, size) and the indices (B',) of the
    items that decoded (on `device`, to select their labels)."""
    jpeg_at = [i for i, item in enumerate(batch.items) if item.ndim == 1]
    decoded: list[torch.Tensor | None] = [item.to(device, non_blocking=True) if item.ndim == 3 else None for item in batch.items]
    if jpeg_at:
        for i, image in zip(jpeg_at, _decode_jpegs([batch.items[i] for i in jpeg_at], device)):
            decoded[i] = image
    keep = [i for i, image in enumerate(decoded) if image is not None]
    if not keep:
        raise AutoclsError(
            f"None of the {len(batch)} JPEGs of a batch could be decoded; check the files, or set "
            "data.gpu_decode=false to decode (and skip unreadable files) in the DataLoader workers."
        )
    images = resize_center_crop_batch([decoded[i] for i in keep], size, crop_pct)
    return images, torch.tensor(keep, device=device)
