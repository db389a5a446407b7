"""Batch JPEG decoding for streamed folders (`data.gpu_decode`): the workers' items, the batched
decode + resize against the CPU path (run on the CPU here; the `gpu` tests run it with nvJPEG), the
skipping of corrupt files, and the one-sentence error without CUDA."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from src.datamodules.folder import ImageFolderDataModule
from src.datamodules.gpu_jpeg import (
    EncodedBatch,
    EncodedImageDataset,
    collate_encoded,
    decode_batch,
)
from src.datamodules.image_files import load_rgb, resize_center_crop
from src.train import train
from src.utils.errors import AutoclsError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colour image (JPEG-friendly, so decoders agree closely)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    channels = [127 + 100 * np.sin(x / (5 + 3 * c) + rng.uniform(0, 6)) * np.cos(y / (7 + c)) for c in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """Class folders with JPEGs of three sizes, a grayscale JPEG, a PNG, a JPEG with an EXIF rotation
    and a truncated JPEG (train/b/broken.jpg)."""
    root = tmp_path_factory.mktemp("jpegs")
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
    for i, (h, w) in enumerate([(32, 32), (32, 32), (40, 56), (64, 48)]):
        Image.fromarray(_smooth(h, w, i)).save(root / "train" / "a" / f"{i}.jpg", quality=95)
    Image.fromarray(_smooth(36, 36, 9)[..., 0]).save(root / "train" / "b" / "gray.jpg", quality=95)
    Image.fromarray(_smooth(30, 34, 10)).save(root / "train" / "b" / "lossless.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(_smooth(32, 48, 11)).save(root / "train" / "b" / "rotated.jpg", quality=95, exif=exif)
    data = io.BytesIO()
    Image.fromarray(_smooth(32, 32, 12)).save(data, format="JPEG", quality=95)
    (root / "train" / "b" / "broken.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) * 3 // 4])
    return root


def _samples(root):
    return [(str(p), int(p.parent.name == "b")) for p in sorted((root / "train").rglob("*.*"))]


def test_workers_send_jpeg_bytes_and_pixels_for_what_nvjpeg_cannot_decode(jpeg_folder):
    items = {p.split("/")[-1]: item for (p, _), item in zip(_samples(jpeg_folder), EncodedImageDataset(_samples(jpeg_folder)))}
    assert items["0.jpg"][0].ndim == 1 and items["gray.jpg"][0].ndim == 1  # bytes for the GPU
    assert items["0.jpg"][0][:2].tolist() == [0xFF, 0xD8]
    assert items["lossless.png"][0].shape == (3, 30, 34)  # decoded by the worker
    assert items["rotated.jpg"][0].shape == (3, 48, 32)  # EXIF applied by the worker
    batch = collate_encoded(list(EncodedImageDataset(_samples(jpeg_folder))))
    assert isinstance(batch[0], EncodedBatch) and len(batch[0]) == len(batch[1]) == 8


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_batch_decode_matches_the_cpu_path_and_skips_corrupt_files(jpeg_folder, device, crop_pct, caplog):
    samples = _samples(jpeg_folder)
    batch, labels = collate_encoded(list(EncodedImageDataset(samples)))
    with caplog.at_level("WARNING"):
        images, kept = decode_batch(batch, 24, crop_pct, torch.device(device))
    good = [i for i, (p, _) in enumerate(samples) if not p.endswith("broken.jpg")]
    assert kept.tolist() == good and "Skipping a JPEG" in caplog.text
    assert images.shape == (len(good), 3, 24, 24) and images.dtype == torch.uint8
    expected = torch.stack([
        torch.from_numpy(np.array(resize_center_crop(load_rgb(samples[i][0]), 24, crop_pct))).permute(2, 0, 1) for i in good
    ])
    diff = (images.cpu().float() - expected.float()).abs()
    # PIL's and torch's antialiased bilinear filters differ by rounding only (measured on the CPU: mean
    # 0.2, max 1); nvJPEG's IDCT is allowed a few levels more
    mean_tol, max_tol = (0.5, 2) if device == "cpu" else (1.5, 16)
    assert diff.mean() < mean_tol and diff.amax() <= max_tol, (diff.mean(), diff.amax())
    assert labels[kept.cpu()].tolist() == [samples[i][1] for i in good]


def test_gpu_decode_without_cuda_is_one_sentence(compose_train, jpeg_folder):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = compose_train(["data=image_folder", f"data.data_dir={jpeg_folder}", "data.image_size=16", "data.in_memory=false",
                         "data.gpu_decode=true", "data.num_workers=0", "data.batch_size=2", "trainer.fast_dev_run=true",
                         "logger=none"])
    with pytest.raises(AutoclsError, match=r"data.gpu_decode=true decodes JPEGs on a CUDA GPU .* set data.gpu_decode=false"):
        train(cfg)


@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_trains_with_device_augmentation(compose_train, jpeg_folder):
    cfg = compose_train(["data=image_folder", f"data.data_dir={jpeg_folder}", "data.image_size=16", "data.in_memory=false",
                         "data.gpu_decode=true", "data.num_workers=2", "data.batch_size=4", "augmentation=randaugment",
                         "trainer=gpu", "trainer.fast_dev_run=true", "logger=none"])
    metrics = train(cfg)
    assert 0 <= metrics["test/acc"] <= 1


def test_gpu_decode_is_ignored_for_in_memory_splits(jpeg_folder):
    dm = ImageFolderDataModule(data_dir=str(jpeg_folder), image_size=16, in_memory=True, gpu_decode=True, num_workers=0,
                               val_fraction=0.25, test_fraction=0.0)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.uint8
