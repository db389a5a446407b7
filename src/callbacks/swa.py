"""Stochastic Weight Averaging (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better
Generalization"): from `swa_start_epoch` on, train with a constant (or cyclic) SWA learning rate and
average the weights once per epoch (or every k steps); the average, with BatchNorm statistics
recomputed for it over the training data, is the model that is validated, tested and saved.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import RunningStage
from torch import nn
from torch.optim.swa_utils import update_bn

from src.callbacks.ema import EMA
from src.utils.errors import AutoclsError


class SWA(EMA):
    """SWA as a weight-averaging callback: `EMA`'s machinery (the average lives beside `net`, is swapped
    in for validation, is the `state_dict` of every checkpoint, and replaces `net` when training ends)
    with an equal-weight running mean, i.e. the decay `n / (n + 1)` at the n-th update.

    * When: at the end of every epoch from `swa_start_epoch` (an epoch index, or a fraction of
      `trainer.max_epochs` when below 1), or every `every_n_steps` optimizer steps in those epochs.
    * Learning rate, from the first SWA epoch: a cosine transition over `anneal_epochs` from the lr the
      run's schedule has reached to the constant `swa_lr` (for every parameter group; None keeps each
      group's reached lr), as torch's `SWALR`; or, with `cycle_lr`, the paper's cyclic schedule (Eq. 2):
      within each averaging period the lr falls linearly from `cycle_lr` to `swa_lr`, and the average
      is taken at its end. The lr is set before every SWA step as a function of the progress only, so
      the run's scheduler keeps its state untouched and a resume needs nothing beyond the start lrs.
    * BatchNorm: averaged weights need their own statistics. Before the average is validated or saved
      (and only if it changed since), `torch.optim.swa_utils.update_bn` runs it over the training
      split. Batches go through the datamodule's transfer hooks (`on_after_batch_transfer`
      normalises); the stage is set to validating meanwhile, so in-memory data is not augmented and
      BN sees the training images as evaluation will see the test images (streamed data keeps its
      per-sample training transform). This costs one forward pass over the training data per
      validation during the SWA epochs, as in the authors' code, and keeps every reported `val/*`
      metric and every checkpoint consistent with the final model.

    With `callbacks=swa` the checkpoint callback monitors nothing, so the "best" checkpoint that
    `train.py` tests is the newest one: the final average (selecting an epoch by val/acc could return a
    model from before averaging). `checkpoints/last.ckpt` holds the same weights.
    """

    def __init__(
        self,
        swa_lr: float | None = None,
        swa_start_epoch: float = 0.75,
        anneal_epochs: float = 1.0,
        cycle_lr: float | None = None,
        every_n_steps: int | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps or 1)
        if (swa_lr is not None and swa_lr <= 0) or (cycle_lr is not None and cycle_lr <= 0):
            raise AutoclsError(f"callbacks.swa.swa_lr={swa_lr} and cycle_lr={cycle_lr} must be positive (or null).")
        if swa_start_epoch < 0 or anneal_epochs < 0:
            raise AutoclsError("callbacks.swa.swa_start_epoch and anneal_epochs must not be negative.")
        self.swa_lr, self.swa_start_epoch, self.anneal_epochs = swa_lr, swa_start_epoch, anneal_epochs
        self.cycle_lr, self.per_epoch = cycle_lr, every_n_steps is None
        self._start_epoch = 0
        self._start_lrs: list[float] | None = None  # the lrs of the schedule when SWA began
        self._bn_fresh_at = 0  # value of `_updates` when BN statistics were last recomputed

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_lrs, self._bn_fresh_at = None, 0
        super().on_fit_start(trainer, pl_module)
        start = self.swa_start_epoch
        if 0 < start < 1:
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise AutoclsError("callbacks.swa.swa_start_epoch as a fraction needs trainer.max_epochs; give an epoch index.")
            start = trainer.max_epochs * start
        self._start_epoch = int(start)

    def _in_swa(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch >= self._start_epoch

    # --- averaging -------------------------------------------------------------------------------
    def _should_update(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        if not self._in_swa(trainer):
            return False
        if self.per_epoch:
            return batch_idx + 1 >= trainer.num_training_batches
        return super()._should_update(trainer, batch_idx)

    def _decay(self, step: int) -> float:
        # the (n+1)-th model enters the running mean with weight 1 / (n + 1)
        return self._updates / (self._updates + 1)

    # --- learning rate ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if not self._in_swa(trainer):
            return
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        if self._start_lrs is None:
            self._start_lrs = [group["lr"] for group in groups]
        for group, start_lr in zip(groups, self._start_lrs):
            group["lr"] = self._lr(trainer, batch_idx, start_lr)

    def _lr(self, trainer: pl.Trainer, batch_idx: int, start_lr: float) -> float:
        target = start_lr if self.swa_lr is None else self.swa_lr
        if self.cycle_lr is not None:
            # step i of a period of c steps uses t = (i mod c + 1) / c: the last one trains at `target`
            i, c = (batch_idx, trainer.num_training_batches) if self.per_epoch else (trainer.global_step, self.every_n_steps)
            t = (i % c + 1) / c
            return (1 - t) * self.cycle_lr + t * target
        epochs = trainer.current_epoch - self._start_epoch + batch_idx / trainer.num_training_batches
        if epochs >= self.anneal_epochs:
            return target
        w = (1 - math.cos(math.pi * epochs / self.anneal_epochs)) / 2
        return (1 - w) * start_lr + w * target

    # --- BatchNorm statistics --------------------------------------------------------------------
    def _prepare_average(self, trainer: pl.Trainer) -> None:
        if self._bn_fresh_at == self._updates:
            return
        module = self._average.module
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            source = trainer.datamodule or trainer.lightning_module
            loader = source.train_dataloader()
            with _validating(trainer), trainer.precision_plugin.forward_context():
                # the datamodule's transfer hooks turn uint8 batches into normalised float images
                images = (trainer.strategy.batch_to_device(batch)[0] for batch in loader)
                update_bn(images, module)
        self._bn_fresh_at = self._updates

    # --- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state:
            state.update(start_lrs=self._start_lrs, bn_fresh_at=self._bn_fresh_at)
        return state

    def _load_state(self, state: dict) -> None:
        super()._load_state(state)
        self._start_lrs, self._bn_fresh_at = state["start_lrs"], state["bn_fresh_at"]


@contextmanager
def _validating(trainer: pl.Trainer) -> Iterator[None]:
    """The datamodule augments in-memory batches only while `trainer.training`; outside validation
    (at the end of an epoch or of training) this makes the BN pass see un-augmented images too."""
    stage = trainer.state.stage
    trainer.state.stage = RunningStage.VALIDATING
    try:
        yield
    finally:
        trainer.state.stage = stage
