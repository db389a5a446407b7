"""Stop at the first NaN/inf training loss, before a checkpoint can capture the broken weights."""

from __future__ import annotations

import math

import pytorch_lightning as pl

from src.utils.errors import AutoclsError


class NonFiniteLossError(AutoclsError):
    """Training produced a NaN or infinite loss."""


class FiniteLossGuard(pl.Callback):
    """Raises `NonFiniteLossError` when the training loss is not finite.

    Raising (rather than setting `trainer.should_stop`) matters: a graceful stop would still run the
    end-of-epoch checkpointing and overwrite `last.ckpt` with the diverged weights. After the raise the
    checkpoints on disk are the last good ones, and the message says which is newest.
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        self.check_every_n_steps = check_every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.check_every_n_steps:
            return
        # manual optimisation may return nothing for a step ({}): nothing to check then
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss)
        if math.isfinite(value):
            return
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none was written yet"
        raise NonFiniteLossError(
            f"Training loss became {value} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"the last good checkpoint is {ckpt}: lower the learning rate (optimizer.lr=...), add warmup "
            "(scheduler.warmup_epochs=...) or clip gradients (trainer.gradient_clip_val=1.0)."
        )
