"""Make every checkpoint self-describing: the composed run config and what the data looks like."""

from __future__ import annotations

import pytorch_lightning as pl

CHECKPOINT_KEY = "autocls"


class RunMetadata(pl.Callback):
    """Adds `checkpoint["autocls"] = {"config": ..., "data": ...}`: the resolved config of the run (so
    `eval.py`, export and prediction rebuild the network without the user repeating overrides) and
    the data description (class names, image size, normalisation; see
    `ClassificationDataModule.describe`). The train task adds this callback itself."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        data = trainer.datamodule.describe() if trainer.datamodule is not None else None
        checkpoint[CHECKPOINT_KEY] = {"config": self.config, "data": data}
