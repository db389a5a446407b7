"""FixRes (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"): random-resized-crop
training makes objects look larger than the centre-cropped test images do, and BatchNorm statistics
and the classifier are tuned to the training view. Fine-tuning the classifier and the BatchNorm layers
for a few epochs on images prepared exactly as at test time, at the test resolution, removes the
discrepancy and lets the network be evaluated at a higher resolution than it was trained at.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from src.augment.pipeline import Augmentation
from src.callbacks.freeze_backbone import batch_norms, freeze, unfreeze
from src.datamodules.base import TensorSplit
from src.utils.errors import AutoclsError


def resize_center_crop(images: torch.Tensor, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """The evaluation transform on a float batch (B, C, H, W) on its device: the shorter side to
    `round(size / crop_pct)`, then the centre `size` x `size` square, as torchvision's `Resize` +
    `CenterCrop` (bilinear, antialiased when shrinking). Linear in the pixel values, so it may run
    before or after normalisation."""
    h, w = images.shape[-2:]
    short = round(size / crop_pct)
    if min(h, w) != short:
        new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        h, w = new_h, new_w
    top, left = round((h - size) / 2), round((w - size) / 2)
    return images[..., top : top + size, left : left + size]


class _TestView(nn.Module):
    """`resize_center_crop` as a module: an augmentation op (see `src.augment.ops`) for in-memory batches."""

    is_crop = True

    def __init__(self, size: int, crop_pct: float) -> None:
        super().__init__()
        self.size, self.crop_pct = size, crop_pct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_center_crop(x, self.size, self.crop_pct)


class FixRes(pl.Callback):
    """For the last `epochs` epochs, train on the test-time view at `test_size` with only the classifier
    (`net.get_classifier()`) and the BatchNorm layers trainable; BN stays in train mode so its running
    statistics adapt to the new view. With `eval_size`, every evaluation of the run (validation, and
    the test in `train.py`) resizes and centre-crops its images to that size first.

    How it plugs into the data: `ClassificationDataModule.on_after_batch_transfer` applies
    `datamodule.augmentation` to in-memory training batches before normalising (and its batch mixing
    after); during the FixRes epochs that attribute is an `Augmentation` whose only op is
    `resize_center_crop` at `test_size` (with the data's `crop_pct`), without mixing. Evaluation
    batches are resized by a forward pre-hook on `net` that acts only in eval mode.

    Limitations: in-memory data only (streamed data is transformed per sample on CPU by loaders built
    before these epochs; a clear error says so). `eval_size` holds inside this run only: `eval.py`,
    export and prediction see the data's own size (for streamed data set `data.image_size` there).
    The lr follows the run's schedule, which a cosine decay to zero makes small in the last epochs
    (`scheduler.min_lr_ratio` keeps some). Nets without BatchNorm (LayerNorm/GroupNorm) tune the
    classifier only. Parameters frozen under DDP need `trainer.strategy=ddp_find_unused_parameters_true`.
    """

    def __init__(self, epochs: int = 1, test_size: int | None = None, eval_size: int | None = None) -> None:
        if epochs < 1:
            raise AutoclsError(f"callbacks.fix_res.epochs={epochs} must be at least 1.")
        self.epochs, self.test_size, self.eval_size = epochs, test_size, eval_size
        self._train_augmentation: Augmentation | None = None  # the one replaced during the FixRes epochs
        self._frozen: list[nn.Parameter] = []
        self._eval_hook = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.eval_size and self._eval_hook is None:
            crop_pct = getattr(trainer.datamodule, "crop_pct", 1.0)
            view = _TestView(self.eval_size, crop_pct)
            self._eval_hook = pl_module.net.register_forward_pre_hook(
                lambda net, args: None if net.training else (view(args[0]), *args[1:])
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        splits = getattr(trainer.datamodule, "splits", {})
        if not isinstance(splits.get("train"), TensorSplit):
            raise AutoclsError(
                "callbacks.fix_res resizes in-memory training batches on the device, but this data is streamed "
                "from disk; use an in-memory dataset or remove callbacks.fix_res."
            )
        if not trainer.max_epochs or trainer.max_epochs < 1:
            raise AutoclsError("callbacks.fix_res trains the last epochs of the run and needs trainer.max_epochs.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # also here: a run resumed mid-epoch does not call on_train_epoch_start for that epoch
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._train_augmentation is not None:
            trainer.datamodule.augmentation = self._train_augmentation
            self._train_augmentation = None
        unfreeze(self._frozen)
        self._frozen = []
        if self._eval_hook is not None:
            self._eval_hook.remove()
            self._eval_hook = None

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < trainer.max_epochs - self.epochs or self._train_augmentation is not None:
            return
        datamodule = trainer.datamodule
        size = self.test_size or datamodule.image_size
        self._train_augmentation = datamodule.augmentation
        datamodule.augmentation = Augmentation(ops={"test_view": _TestView(size, datamodule.crop_pct)})
        net = pl_module.net
        head = net.get_classifier()
        trainable = {id(p) for m in (head, *batch_norms(net, exclude=head)) for p in m.parameters()}
        self._frozen = freeze(p for p in net.parameters() if id(p) not in trainable)
