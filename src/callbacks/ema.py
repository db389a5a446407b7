"""Exponential moving average (EMA) of the network's weights, which validation, test, checkpoints and
everything downstream of them (eval.py, export, prediction) use instead of the raw training weights.

Averaging the iterates of SGD (Polyak & Juditsky 1992) in its exponential form, as in TensorFlow's
`ExponentialMovingAverage` and timm's `ModelEmaV3`: after optimizer step t,
`ema <- d_t * ema + (1 - d_t) * weights`, with the warmup `d_t = min(decay, (1 + t) / (10 + t))` so
that short runs are not dominated by the initial weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


class EMA(pl.Callback):
    """Keeps an EMA of `pl_module.net`'s parameters and buffers on the net's device, updated after every
    `every_n_steps`-th optimizer step (`torch.optim.swa_utils.AveragedModel` is the engine; its first
    update copies the weights).

    Where the averaged weights go:

    * validation: swapped into `net` in `on_validation_start` and out again in `on_validation_end`,
      so `val/*` metrics (and checkpoint selection by them) describe the averaged weights;
    * checkpoints: `on_save_checkpoint` puts the averaged weights into `checkpoint["state_dict"]`, so
      any checkpoint (best, last, interrupt) is the averaged model for `eval.py`, export and
      prediction with no special code. The raw training weights go into this callback's own state,
      and on resume (`on_fit_start`) they return to `net` while the checkpoint's `state_dict` seeds
      the average, so a resumed run continues exactly;
    * after training: `on_train_end` copies the average into `net` for good, so `trainer.test` or
      `trainer.predict` on the in-memory model use it too (the raw weights are discarded).

    BatchNorm running statistics are averaged like the weights (as timm's ModelEmaV3 does): they
    then track the statistics of slowly moving weights, close to what the averaged network would
    measure; copying the raw model's statistics would pair them with weights they were not computed
    for. Integer buffers (`num_batches_tracked`) are counters and are copied.

    `SWA` (src/callbacks/swa.py) subclasses this: a running mean is the EMA with `d_n = n / (n + 1)`.

    Args:
        decay: The EMA decay `d` per update (timm uses 0.9998 for ImageNet-length runs).
        warmup: Use `min(decay, (1 + t) / (10 + t))` at optimizer step t.
        every_n_steps: Update after every n-th optimizer step (cheaper for large models).
    """

    def __init__(self, decay: float = 0.9998, warmup: bool = True, every_n_steps: int = 1) -> None:
        if not 0.0 <= decay <= 1.0:
            raise AutoclsError(f"{type(self).__name__}: decay={decay} must be in [0, 1]; typical values are 0.999 to 0.9999.")
        if every_n_steps < 1:
            raise AutoclsError(f"{type(self).__name__}: every_n_steps={every_n_steps} must be a positive number of steps.")
        self.decay, self.warmup, self.every_n_steps = decay, warmup, every_n_steps
        self._net: nn.Module | None = None
        self._prefix = "net."  # of the net's keys in the LightningModule's state_dict
        self._average: AveragedModel | None = None
        self._updates = 0  # models averaged so far (AveragedModel.n_averaged, kept on the host)
        self._last_update_step = 0  # global step of the last update: micro-batches of one step update once
        self._swapped = False  # whether `net` holds the average right now (during validation)
        self._restored: dict | None = None  # state from a checkpoint, applied when the fit starts

    # --- what a subclass changes ---------------------------------------------------------------
    def _should_update(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    def _decay(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (1 for the first step)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def _prepare_average(self, trainer: pl.Trainer) -> None:
        """Called before the averaged weights are used (validated, saved, kept); SWA recomputes BN here."""

    # --- building and restoring the average ----------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after strategy setup: the net is on its device, and on resume it already holds the
        # checkpoint's state_dict, which is the average (see on_save_checkpoint)
        self._net, self._prefix = _unwrapped_net(pl_module)
        self._average = AveragedModel(self._net, use_buffers=True)
        self._swapped = False
        state, self._restored = self._restored, None
        self._updates, self._last_update_step = 0, 0
        if state:
            self._load_state(state)
            self._average.n_averaged.fill_(self._updates)
            if "raw" in state:
                self._net.load_state_dict(state["raw"])

    def _load_state(self, state: dict) -> None:
        self._updates, self._last_update_step = state["updates"], state["last_update_step"]

    def state_dict(self) -> dict[str, Any]:
        if self._average is None:
            return {}
        state = {"updates": self._updates, "last_update_step": self._last_update_step}
        if self._updates:  # the checkpoint's state_dict holds the average, so the raw weights go here
            state["raw"] = self._raw_and_average()[0].state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # called before the fit sets up the net (and also when testing a checkpoint, then unused)
        self._restored = state_dict

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._average is None or not self._updates:
            return
        average = self._raw_and_average()[1]
        checkpoint["state_dict"].update({self._prefix + k: v for k, v in average.state_dict().items()})

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._swapped:  # an exception during validation
            self._swap()
        self._restored = None

    # --- updating --------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_update_step or not self._should_update(trainer, batch_idx):
            return
        self._average.multi_avg_fn = _ema_update(self._decay(step))
        self._average.update_parameters(self._net)
        self._updates += 1
        self._last_update_step = step

    # --- using the average -----------------------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average is not None and self._updates:
            self._prepare_average(trainer)
            self._swap()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before ModelCheckpoint saves (it runs after the other callbacks), which on_save_checkpoint handles
        if self._swapped:
            self._swap()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint saves in this hook after us: the average it gets must be ready
        if self._average is not None and self._updates:
            self._prepare_average(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average is None:
            return
        if self._updates:
            self._prepare_average(trainer)
            self._net.load_state_dict(self._average.module.state_dict())
            log.info(f"{type(self).__name__}: the network now holds the average of {self._updates} updates")
        else:
            log.warning(f"{type(self).__name__} never updated its average; the network keeps its trained weights.")
        self._average = None  # training is over: the average is the model now

    def _raw_and_average(self) -> tuple[nn.Module, nn.Module]:
        """The modules holding the raw and the averaged weights (they trade places during validation)."""
        if self._swapped:
            return self._average.module, self._net
        return self._net, self._average.module

    @torch.no_grad()
    def _swap(self) -> None:
        for a, b in zip(_tensors(self._average.module), _tensors(self._net)):
            tmp = a.clone()
            a.copy_(b)
            b.copy_(tmp)
        self._swapped = not self._swapped


def _ema_update(decay: float) -> Callable:
    """An `AveragedModel` `multi_avg_fn` for one update with `decay`. AveragedModel calls it once per
    dtype: floating tensors are interpolated (torch's EMA kernel), integer buffers copied."""
    interpolate = get_ema_multi_avg_fn(decay)

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if averaged[0].is_floating_point():
            interpolate(averaged, current, num_averaged)
        else:
            for a, c in zip(averaged, current):
                a.copy_(c)

    return update


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _unwrapped_net(pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
    """`pl_module.net` (without a torch.compile wrapper) and the prefix of its keys in the module's state_dict."""
    net = getattr(pl_module, "net", None)
    if not isinstance(net, nn.Module):
        raise AutoclsError(
            f"Weight averaging averages the LightningModule's `net`, which {type(pl_module).__name__} does not have; "
            "remove callbacks.ema / callbacks.swa for this model."
        )
    if hasattr(net, "_orig_mod"):
        return net._orig_mod, "net._orig_mod."
    return net, "net."
