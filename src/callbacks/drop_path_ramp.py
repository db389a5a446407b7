"""Raise a network's drop-path rate linearly over training, as the DARTS (and NASNet) recipes do."""

from __future__ import annotations

import pytorch_lightning as pl
from torch import nn

from src.utils.errors import AutoclsError


class DropPathRamp(pl.Callback):
    """At the start of every training epoch sets `net.drop_path_prob = p * epoch / max_epochs`, where p
    is the rate the network was built with (`model.net.drop_path_prob`).

    The DARTS training script does exactly this per epoch: an untrained network with its paths dropped
    at the full rate learns slowly, while late in training the regularisation matters most. The target
    is saved in checkpoints, so a resumed run continues the same ramp.
    """

    def __init__(self) -> None:
        self.target: float | None = None

    @staticmethod
    def _net(pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, "net", None)
        net = getattr(net, "_orig_mod", net)  # torch.compile's wrapper
        if net is None or not hasattr(net, "drop_path_prob"):
            raise AutoclsError(
                "callbacks=drop_path_ramp needs a network with a drop_path_prob (model/net=darts_net); "
                "remove the callback for this network."
            )
        return net

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.target is None:
            self.target = float(self._net(pl_module).drop_path_prob)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = max(1, trainer.max_epochs or 1)
        rate = self.target * trainer.current_epoch / epochs
        self._net(pl_module).drop_path_prob = rate
        pl_module.log("train/drop_path_prob", rate, on_step=False, on_epoch=True)

    def state_dict(self) -> dict:
        return {"target": self.target}

    def load_state_dict(self, state_dict: dict) -> None:
        self.target = state_dict["target"]
