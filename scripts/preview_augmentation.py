"""Preview a training augmentation as a PNG grid: a few images of the configured data in the first row,
then one row per draw of the training augmentation as training applies it on the device (ops, then
normalisation and batch mixing; shown de-normalised, with the mixed targets as captions).

    python scripts/preview_augmentation.py augmentation=randaugment_cutmix
    python scripts/preview_augmentation.py augmentation=gridmask data=image_folder data.data_dir=<root>
    python scripts/preview_augmentation.py augmentation=cutout --rows 6 --images 10 --out cutout.png

The config is `configs/train.yaml` composed with the overrides, as `train.py` would; the images are
spread evenly over the validation split, decoded at the data's image size. Writes `previews/<name>.png` by
default and prints the path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from hydra import compose, initialize_config_dir

from src.datamodules.base import TensorSplit
from src.datamodules.image_files import decode_to_tensor
from src.utils.instantiate import build_datamodule

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4, help="augmented rows (draws)")
    parser.add_argument("--images", type=int, default=8, help="images per row")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default previews/<augmentation>.png)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. augmentation=cutmix data=image_folder")
    args = parser.parse_args()

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        # no DataLoader worker processes for a handful of images
        cfg = compose("train.yaml", overrides=["++data.num_workers=0", *args.overrides], return_hydra_config=True)
    name = cfg.hydra.runtime.choices.augmentation
    torch.manual_seed(cfg.seed)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    images, labels = _spread_sample(datamodule.splits["val"], args.images, datamodule)
    images = images.float() / 255

    augmentation = datamodule.augmentation
    names = datamodule.describe()["class_names"]
    mean = torch.tensor(datamodule.mean).view(1, -1, 1, 1)
    std = torch.tensor(datamodule.std).view(1, -1, 1, 1)
    rows, captions = [images], [[names[int(y)] for y in labels]]
    for _ in range(args.rows):
        mixed, targets = augmentation.mix(datamodule.normalize(augmentation(images)), labels, datamodule.num_classes)
        rows.append((mixed * std + mean)[: len(images)])
        captions.append([_caption(t, names) for t in targets])

    out = args.out or ROOT / "previews" / f"{name}.png"
    _plot(rows, captions, f"augmentation={name}", out)
    print(out)


def _spread_sample(split, k: int, datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    """k images evenly spaced over the split (splits are often ordered by class, so the first k
    would all share one label)."""
    idx = torch.linspace(0, len(split) - 1, min(k, len(split))).round().long()
    if isinstance(split, TensorSplit):
        return split.images[idx], split.labels[idx]
    images, labels, _ = decode_to_tensor([split.samples[i] for i in idx.tolist()], datamodule.image_size,
                                         datamodule.crop_pct)
    return images, labels


def _caption(target: torch.Tensor, names: list[str]) -> str:
    """The class name for an integer label; the two largest class weights of a mixed target."""
    if not target.is_floating_point():
        return names[int(target)]
    weights, classes = target.topk(min(2, len(target)))
    return " ".join(f"{int(c)}:{float(w):.2f}" for c, w in zip(classes, weights) if w > 0.005)


def _plot(rows: list[torch.Tensor], captions: list[list[str]], title: str, out: Path) -> None:
    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.4 * n_cols, 1.5 * n_rows), squeeze=False)
    for r, (row, texts) in enumerate(zip(rows, captions)):
        for c, (image, text) in enumerate(zip(row, texts)):
            ax = axes[r][c]
            pixels = image.clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=1)
            ax.set_title(text, fontsize=7)
            ax.axis("off")
    fig.suptitle(f"{title} (first row: originals)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
