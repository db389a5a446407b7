"""What `eval.py` reports beyond top-1/top-5: test-time augmentation, confusion matrix, per-class
accuracy and expected calibration error, from the same single pass over the test split."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from src.evaluation.calibration import expected_calibration_error
from src.evaluation.confusion import (
    confusion_matrix,
    per_class_accuracy,
    plot_confusion_matrix,
    write_confusion_csv,
    write_per_class_csv,
)
from src.evaluation.tta import TTA_MODES, TTANet
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


class EvalExtras(pl.Callback):
    """During `trainer.test`: runs the network under test-time augmentation `tta` (so Lightning's
    `test/acc`, `test/loss`, ... describe the augmented predictions), records each test image's
    top-1 prediction and confidence, and at the end writes into `output_dir`:

    * `confusion_matrix.png` and `confusion_matrix.csv` (rows: true class, columns: predicted);
    * `per_class_accuracy.csv` (support, correct, accuracy per class), also logged to the loggers
      as `test/class_acc/<class name>`;
    * `self.metrics`: `test/ece` (expected calibration error over `ece_bins` confidence bins),
      `test/class_acc/<name>` and `test/class_acc_min` (the worst class), for the task to return.

    The logits are read from the LightningModule's `net` (a forward hook), so a module whose test
    step calls its network once per batch works (ClassifierLitModule, DartsSearchLitModule). For one
    without `net`, or calling it several times per batch (a CARS population), the extras are skipped
    with a warning and only `tta=none` is possible.
    """

    def __init__(
        self, output_dir: str | Path, tta: str = "none", ece_bins: int = 15, class_names: Sequence[str] | None = None
    ) -> None:
        if tta not in TTA_MODES:
            raise AutoclsError(f"Unknown tta mode '{tta}'; use one of {', '.join(TTA_MODES)}.")
        if ece_bins < 1:
            raise AutoclsError(f"ece_bins={ece_bins} must be at least 1; 15 is the usual choice.")
        # None: the test data module's class names (known once it is set up)
        self.output_dir, self.class_names = Path(output_dir), list(class_names) if class_names else None
        self.tta, self.ece_bins = tta, ece_bins
        self.metrics: dict[str, float] = {}
        self._net: nn.Module | None = None
        self._hook = None
        self._predictions: list[torch.Tensor] = []
        self._confidences: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._pending: list[torch.Tensor] = []  # outputs of `net` for the batch being tested
        self._active = False

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = getattr(pl_module, "net", None)
        self._active = isinstance(net, nn.Module)
        if not self._active:
            if self.tta != "none":
                raise AutoclsError(f"tta={self.tta} needs the LightningModule's `net`, which {type(pl_module).__name__} lacks; use tta=none.")
            log.warning(f"{type(pl_module).__name__} has no `net`: no confusion matrix, per-class accuracy or ECE.")
            return
        if self.tta != "none":
            self._net = net
            pl_module.net = TTANet(net, self.tta)
        if self.class_names is None:
            datamodule = trainer.datamodule
            self.class_names = list(datamodule.describe()["class_names"]) if datamodule is not None else [
                str(i) for i in range(pl_module.net.num_classes)]
        self._predictions, self._confidences, self._labels, self._pending = [], [], [], []
        self._hook = pl_module.net.register_forward_hook(self._keep_logits)

    def _keep_logits(self, module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            self._pending.append(output.detach())

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        pending, self._pending = self._pending, []
        if not self._active:
            return
        if len(pending) != 1:
            log.warning(
                f"{type(pl_module).__name__} ran its network {len(pending)} times on a test batch: "
                "no confusion matrix, per-class accuracy or ECE for it."
            )
            self._active = False
            return
        logits = pending[0]
        labels = batch[1]
        if labels.is_floating_point():  # probability targets: their argmax is the class
            labels = labels.argmax(dim=1)
        probabilities = logits.float().softmax(dim=1)
        confidence, prediction = probabilities.max(dim=1)
        self._predictions.append(prediction.cpu())
        self._confidences.append(confidence.cpu())
        self._labels.append(labels.cpu())

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._net is not None:
            pl_module.net, self._net = self._net, None
        if not self._active or not self._labels or not trainer.is_global_zero:
            return
        if trainer.world_size > 1:
            log.warning("Evaluation extras describe this process's share of the test split only (multi-device test).")
        self._report(trainer)

    def _report(self, trainer: pl.Trainer) -> None:
        predictions, labels = torch.cat(self._predictions), torch.cat(self._labels)
        confidences = torch.cat(self._confidences)
        num_classes = len(self.class_names)
        matrix = confusion_matrix(predictions, labels, num_classes)
        accuracy = per_class_accuracy(matrix)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_per_class_csv(matrix, self.class_names, self.output_dir / "per_class_accuracy.csv")
        write_confusion_csv(matrix, self.class_names, self.output_dir / "confusion_matrix.csv")
        top1 = float((predictions == labels).double().mean())
        title = f"{len(labels)} test images, top-1 {100 * top1:.2f}%" + (f", TTA {self.tta}" if self.tta != "none" else "")
        plot_confusion_matrix(matrix, self.class_names, self.output_dir / "confusion_matrix.png", title=title)

        class_metrics = {f"test/class_acc/{_metric_name(n)}": float(a) for n, a in zip(self.class_names, accuracy.tolist()) if not math.isnan(a)}
        self.metrics = {
            "test/ece": expected_calibration_error(confidences, predictions == labels, self.ece_bins),
            "test/class_acc_min": min(class_metrics.values(), default=float("nan")),
            **class_metrics,
        }
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)
            logger.save()
        log.info(
            f"ECE ({self.ece_bins} bins) {self.metrics['test/ece']:.4f}, worst class accuracy "
            f"{self.metrics['test/class_acc_min']:.4f}; confusion matrix and per-class table in {self.output_dir}"
        )


def _metric_name(class_name: str) -> str:
    """A class name usable inside a metric key (loggers dislike spaces and slashes)."""
    return re.sub(r"[^\w.-]+", "_", str(class_name)).strip("_") or "class"
