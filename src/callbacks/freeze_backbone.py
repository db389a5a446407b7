"""Train only the classifier for the first epochs of a run, then everything: the usual recipe for
fine-tuning a pretrained backbone with a new head (linear probing then fine-tuning, Kumar et al. 2022,
"Fine-Tuning can Distort Pretrained Features"; the first stage of gradual unfreezing, Howard & Ruder
2018), so the random head's large early gradients do not wreck the pretrained features.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytorch_lightning as pl
from torch import nn

from src.utils.errors import AutoclsError


def freeze(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Stop training `params`; returns the ones that were trainable, to hand to `unfreeze` later.

    They stay in the optimizer (nothing is rebuilt). `grad = None` matters: torch optimizers skip
    parameters without a gradient, while a zero gradient would still let weight decay and momentum
    move them (SGD, AdamW); with `requires_grad=False` backward never creates one again."""
    frozen = [p for p in params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
        p.grad = None
    return frozen


def unfreeze(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(True)


def batch_norms(module: nn.Module, exclude: nn.Module | None = None) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `module`, except those inside `exclude`."""
    excluded = set(exclude.modules()) if exclude is not None else set()
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in excluded]


class FreezeBackbone(pl.Callback):
    """For the first `epochs` epochs only `net.get_classifier()` trains (the classifier of the timm
    contract every net follows); the rest of the net is frozen and its BatchNorm layers are in eval
    mode, so their running statistics (e.g. from pretraining) stay as they are. Then everything trains.

    Freezing toggles `requires_grad` and clears gradients (see `freeze`): the parameters stay in the
    optimizer, which needs no rebuilding when they thaw (unlike Lightning's `BaseFinetuning`, which
    adds parameter groups). The state follows from the epoch alone, so resuming needs nothing saved.
    Under DDP the frozen parameters get no gradients: use `trainer.strategy=ddp_find_unused_parameters_true`.
    """

    def __init__(self, epochs: int = 1) -> None:
        if epochs < 0:
            raise AutoclsError(f"callbacks.freeze_backbone.epochs={epochs} must be a number of epochs >= 0.")
        self.epochs = epochs
        self._frozen: list[nn.Parameter] = []
        self._batch_norms: list[nn.Module] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # also here: a run resumed mid-epoch does not call on_train_epoch_start for that epoch
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        # whatever called .train() on the model since (e.g. code restoring modes after validation)
        for bn in self._batch_norms:
            bn.eval()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._thaw()

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen_epoch = trainer.current_epoch < self.epochs
        if frozen_epoch and not self._frozen:
            net = pl_module.net
            head = net.get_classifier()
            head_params = {id(p) for p in head.parameters()}
            self._frozen = freeze(p for p in net.parameters() if id(p) not in head_params)
            self._batch_norms = batch_norms(net, exclude=head)
            for bn in self._batch_norms:
                bn.eval()
        elif not frozen_epoch:
            self._thaw()

    def _thaw(self) -> None:
        unfreeze(self._frozen)
        for bn in self._batch_norms:
            bn.train()
        self._frozen, self._batch_norms = [], []
