"""Raise GridMask's probability linearly from 0 over the first epochs, as PaddleClas does."""

from __future__ import annotations

import pytorch_lightning as pl

from src.augment.erasing import GridMask
from src.utils.errors import AutoclsError


class GridMaskRamp(pl.Callback):
    """At the start of epoch e (from 0), sets the GridMask op's probability to `p * min(1, e / epochs)`,
    where p is the probability the augmentation config gives it (PaddleClas's `GridMask.set_prob`:
    `st_prob * min(1, CURR_EPOCH / NUM_EPOCHS)`, 240 of 300 epochs there; Chen et al. 2020 found the
    ramp better than a constant probability).

    The op is the `GridMask` in `trainer.datamodule.augmentation`. The ramp's state (target, epoch,
    current probability) is saved in checkpoints, so a resumed run continues the ramp where it was.
    """

    def __init__(self, epochs: int) -> None:
        if epochs < 1:
            raise AutoclsError(f"callbacks.gridmask_ramp.epochs={epochs} must be at least 1; use the ramp length in epochs.")
        self.epochs = int(epochs)
        self.target: float | None = None  # the configured p, read from the op on the first fit
        self.epoch = 0
        self.prob = 0.0

    @staticmethod
    def _op(trainer: pl.Trainer) -> GridMask:
        augmentation = getattr(getattr(trainer, "datamodule", None), "augmentation", None)
        ops = [op for op in getattr(augmentation, "ops", {}).values() if isinstance(op, GridMask)]
        if not ops:
            raise AutoclsError("callbacks=gridmask_ramp needs a GridMask op; use augmentation=gridmask.")
        return ops[0]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        op = self._op(trainer)
        if self.target is None:
            self.target = op.prob
        op.prob = self.prob  # 0 on a new run, the saved value on a resumed one

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch = trainer.current_epoch
        self.prob = self.target * min(1.0, self.epoch / self.epochs)
        self._op(trainer).prob = self.prob
        pl_module.log("train/gridmask_prob", self.prob, on_step=False, on_epoch=True)

    def state_dict(self) -> dict:
        return {"epochs": self.epochs, "target": self.target, "epoch": self.epoch, "prob": self.prob}

    def load_state_dict(self, state_dict: dict) -> None:
        self.target, self.epoch, self.prob = state_dict["target"], state_dict["epoch"], state_dict["prob"]
