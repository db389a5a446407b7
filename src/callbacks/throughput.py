"""Training speed as benchmarks need it: images per second after a warm-up, and the fit's wall time.

GPU work is asynchronous, so a clock read on the host says when work was *queued*. This callback
synchronises the device at the two ends of each measured interval only (never per step, which would
stall the host and understate the speed), so the figures include everything the device did between.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput(pl.Callback):
    """`images_per_second`: training images (labels counted) per second from the start of optimizer step
    `warmup_steps` (0-based) to the end of training; `fit_seconds`: from the start of the fit (put this
    callback first, so other callbacks' `on_fit_start` work is timed too) to the end of training,
    validation and checkpoints included."""

    def __init__(self, warmup_steps: int = 0) -> None:
        self.warmup_steps = int(warmup_steps)
        self.images_per_second: float | None = None
        self.fit_seconds: float | None = None
        self._fit_start = self._start = None
        self._images = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self._fit_start, self._start, self._images = time.perf_counter(), None, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._start is None and trainer.global_step >= self.warmup_steps:
            _sync(pl_module.device)
            self._start = time.perf_counter()
        if self._start is not None:
            self._images += len(batch[1])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        end = time.perf_counter()
        self.fit_seconds = end - self._fit_start
        if self._start is not None and end > self._start:
            self.images_per_second = self._images / (end - self._start)
