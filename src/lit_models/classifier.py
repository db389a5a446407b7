"""A classifier as a LightningModule whose parts (net, loss, optimizer, schedule) are injected."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from src.datamodules.sampling import label_counts
from src.evaluation.tta import TTA_MODES, tta_logits
from src.utils.errors import AutoclsError


class ClassifierLitModule(pl.LightningModule):
    """Trains `net` with `loss`; logs `{train,val,test}/loss`, `/acc`, `/acc_top5` and `val/acc_best`.

    `optimizer` and `scheduler` are partials (Hydra `_partial_: true`): the optimizer gets the
    network and the global batch size (`src.optim.optimizers.build_optimizer`), the scheduler the
    optimizer and the run's step counts, and it is stepped per step.
    Targets may be class indices or probabilities (batch mixing); accuracy uses their argmax.

    A training batch with k > 1 images per label holds k views stacked along the batch, the clean
    images first (AugMix `jsd=true`: `[x, augmix(x), augmix(x)]`): `loss` sees the clean logits and
    `consistency` (`src.losses.jsd.JensenShannonConsistency`) is added for the views; metrics use the
    clean view only. `tta` (`src.evaluation.tta.TTA_MODES`: none, flip, multicrop) averages the logits
    of augmented views whenever the module is in eval mode (validation, test, prediction).

    `aux_weight` > 0 trains an auxiliary head too (DARTS evaluation networks, `auxiliary=true`): in
    training the loss is loss(logits) + aux_weight x loss(aux_logits), both from the network's
    `forward_with_aux`; its `forward` returns the main logits alone, so evaluation is unchanged.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: partial,
        scheduler: partial | None = None,
        compile: bool = False,
        channels_last: bool = False,
        consistency: nn.Module | None = None,
        tta: str = "none",
        aux_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise AutoclsError(f"model.tta={tta!r} is not a test-time augmentation; use one of {', '.join(TTA_MODES)}.")
        if aux_weight and not getattr(net, "auxiliary", False):
            raise AutoclsError(
                f"model.aux_weight={aux_weight} needs a network with an auxiliary head; set model.net.auxiliary=true "
                "(model/net=darts_net) or model.aux_weight=0."
            )
        # the injected modules are saved as weights, not as hyperparameters
        self.save_hyperparameters(ignore=["net", "loss", "consistency"], logger=False)
        self.net, self.loss_fn, self.consistency = net, loss, consistency
        num_classes = net.num_classes
        top5 = min(5, num_classes)
        # one set per stage, so their epoch aggregates never mix
        for stage in ("train", "val", "test"):
            # No per-step checks in training: torchmetrics' argument validation (counting unique labels) and
            # NaN check read values back from the device, which would stall the host every step. Training
            # batches are equal-sized (drop_last), so the loss mean needs no weights ("disable" drops them),
            # and FiniteLossGuard watches for NaN.
            checks = stage != "train"
            metrics = {
                "loss": MeanMetric(nan_strategy="warn" if checks else "disable"),
                "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=checks),
                "acc_top5": MulticlassAccuracy(num_classes, top_k=top5, average="micro", validate_args=checks),
            }
            setattr(self, f"{stage}_metrics", nn.ModuleDict(metrics))
        self.val_acc_best = MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tta = self.hparams.get("tta", "none")
        if not self.training and tta != "none":  # validation, test, prediction: one call, averaged views
            return tta_logits(lambda views: self.net(self._layout(views)), x, tta)
        return self.net(self._layout(x))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def setup(self, stage: str) -> None:
        if stage == "fit" and getattr(self.loss_fn, "wants_class_counts", False):
            # e.g. balanced class weights; other stages restore the weights from the checkpoint
            self.loss_fn.set_class_counts(self._train_label_counts())
        if self.hparams.channels_last:
            # NHWC lets cuDNN use tensor-core convolutions without layout transposes (bf16/fp16)
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and stage == "fit":
            self.net = torch.compile(self.net)

    def _train_label_counts(self) -> torch.Tensor:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise AutoclsError(
                "loss.class_weights=balanced needs the train labels; fit with a datamodule or give explicit class_weights."
            )
        return label_counts(datamodule.splits["train"], datamodule.num_classes)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, target = batch
        aux_logits = None
        if stage == "train" and self.hparams.get("aux_weight"):
            # an auxiliary head (DARTS nets) adds aux_weight x its own loss in training
            logits, aux_logits = self.net.forward_with_aux(self._layout(images))
        else:
            logits = self(images)  # under model.tta in validation and test
        views = len(logits) // len(target)
        if views > 1:  # several views per label (AugMix jsd=true): the clean one comes first
            logits, *augmented = logits.chunk(views)
            loss = self.loss_fn(logits, target) + self._consistency(logits, augmented)
        else:
            loss = self.loss_fn(logits, target)
        if aux_logits is not None:
            loss = loss + self.hparams.aux_weight * self.loss_fn(aux_logits[: len(target)], target)
        labels = target.argmax(dim=1) if target.is_floating_point() else target
        metrics = getattr(self, f"{stage}_metrics")
        for name in ("acc", "acc_top5"):
            metrics[name].update(logits.detach(), labels)
            self.log(f"{stage}/{name}", metrics[name], on_step=False, on_epoch=True, prog_bar=name == "acc")
        if stage == "train":
            # the per-step training loss is what a user watches; its epoch mean is train/loss_epoch
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
            metrics["loss"].update(loss.detach(), weight=len(target))
            self.log("train/loss_epoch", metrics["loss"], on_step=False, on_epoch=True)
        else:
            metrics["loss"].update(loss.detach(), weight=len(target))
            self.log(f"{stage}/loss", metrics["loss"], on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _consistency(self, clean: torch.Tensor, augmented: list[torch.Tensor]) -> torch.Tensor:
        if self.consistency is None:
            raise AutoclsError(
                f"The batch holds {len(augmented) + 1} views per label (AugMix jsd=true) but the model has no "
                "consistency loss; set model.consistency._target_=src.losses.jsd.JensenShannonConsistency."
            )
        return self.consistency(clean, *augmented)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best.update(self.val_metrics["acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        from src.optim.optimizers import global_batch_from
        from src.optim.schedulers import per_step_scheduler

        optimizer = self.hparams.optimizer(self.net, global_batch_size=global_batch_from(self.trainer))
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": per_step_scheduler(self.hparams.scheduler, optimizer, self.trainer)}
