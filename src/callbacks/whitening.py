"""Initialise a network's patch-whitening first layer from training images, and train its bias only
for the first epochs (airbench; see `src.models.speedrun_net`)."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch

from src.datamodules.base import TensorSplit
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


class PatchWhitening(pl.Callback):
    """When a fit starts (not when it resumes), calls `net.init_whitening(images, eps)` with
    `num_images` training images drawn by `seed` (folders list their images class by class, so the
    first ones would all be of one class), un-augmented and normalised as the network sees them; then
    trains the whitening layer's bias (`net.whiten.bias`) during the first `bias_epochs` epochs only
    (airbench: 5000 images, eps 5e-4, 3 epochs).

    Streamed training data is decoded for this (the drawn files, resized as in-memory data).
    """

    def __init__(self, num_images: int = 5000, eps: float = 5e-4, bias_epochs: int = 3, seed: int = 0) -> None:
        if num_images < 1 or eps < 0 or bias_epochs < 0:
            raise AutoclsError(
                f"callbacks.whitening needs num_images >= 1, eps >= 0 and bias_epochs >= 0 "
                f"(got {num_images}, {eps}, {bias_epochs}); airbench uses 5000, 5e-4 and 3."
            )
        self.num_images, self.eps, self.bias_epochs, self.seed = int(num_images), float(eps), int(bias_epochs), int(seed)
        self.initialized = False  # saved in checkpoints: a resumed run keeps its restored whitening

    @staticmethod
    def _net(pl_module: pl.LightningModule):
        net = getattr(pl_module, "net", None)
        net = getattr(net, "_orig_mod", net)  # torch.compile's wrapper
        if not hasattr(net, "init_whitening"):
            raise AutoclsError(
                f"callbacks.whitening initialises a patch-whitening first layer, which {type(net).__name__} does not "
                "have; use model/net=speedrun or remove callbacks.whitening."
            )
        return net

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self._net(pl_module)
        if self.initialized:
            return
        datamodule = trainer.datamodule
        images = self._train_images(datamodule).to(pl_module.device)
        images = datamodule.normalize(images.float().div_(255))
        net.init_whitening(images, self.eps)
        self.initialized = True
        log.info(f"Whitening layer initialised from {len(images)} training images")

    def _train_images(self, datamodule) -> torch.Tensor:
        split = datamodule.splits["train"]
        chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(self.seed))[: self.num_images]
        if isinstance(split, TensorSplit):
            return split.images[chosen.to(split.images.device)]
        from src.datamodules.image_files import decode_to_tensor

        images, _, _ = decode_to_tensor([split.samples[i] for i in chosen.tolist()], datamodule.image_size)
        return images

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # without a gradient the optimizer leaves the bias as it is from then on
        self._net(pl_module).whiten.bias.requires_grad_(trainer.current_epoch < self.bias_epochs)

    def state_dict(self) -> dict:
        return {"initialized": self.initialized}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initialized = state_dict["initialized"]
