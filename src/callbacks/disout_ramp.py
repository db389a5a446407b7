"""Raise Disout's distortion probability linearly from 0 over the first training steps, as its authors do."""

from __future__ import annotations

import pytorch_lightning as pl
from torch import nn

from src.models.regularizers import Disout
from src.utils.errors import AutoclsError


class DisoutRamp(pl.Callback):
    """Before each training batch, sets every `Disout` module's `dist_prob` to `p * min(1, step / steps)`,
    where p is the value the network was built with and step is `trainer.global_step`.

    Tang et al.'s code (github.com/huawei-noah/Disout) wraps each Disout in a `LinearScheduler` that
    steps `dist_prob` from 0 to p over the first `nr_steps` training iterations (5,000 for their CIFAR
    ResNet-56); a network distorted at full strength from the first step trains worse. The targets
    and the ramp's progress are saved in checkpoints, so a resumed run continues the ramp.
    """

    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise AutoclsError(f"callbacks.disout_ramp.steps={steps} must be at least 1; use the ramp length in optimizer steps.")
        self.steps = int(steps)
        self.targets: list[float] | None = None  # each Disout's configured p, read on the first fit
        self.fraction = 0.0  # of the targets applied now

    @staticmethod
    def _modules(pl_module: nn.Module) -> list[Disout]:
        modules = [m for m in pl_module.modules() if isinstance(m, Disout)]
        if not modules:
            raise AutoclsError("callbacks=disout_ramp needs a network with Disout; set model.net.disout_prob > 0.")
        return modules

    def _apply(self, pl_module: nn.Module) -> None:
        for module, target in zip(self._modules(pl_module), self.targets):
            module.dist_prob = target * self.fraction

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.targets is None:
            self.targets = [m.dist_prob for m in self._modules(pl_module)]
        self._apply(pl_module)  # 0 on a new run, the saved value on a resumed one

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.fraction = min(1.0, trainer.global_step / self.steps)
        self._apply(pl_module)
        pl_module.log("train/disout_fraction", self.fraction, on_step=False, on_epoch=True)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "targets": self.targets, "fraction": self.fraction}

    def load_state_dict(self, state_dict: dict) -> None:
        self.targets, self.fraction = state_dict["targets"], state_dict["fraction"]
