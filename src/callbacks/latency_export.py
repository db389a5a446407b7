"""At the end of fit: export the best model to ONNX, measure its latency, report it as a metric.

This makes latency a measured quantity of every run that asks for it (`callbacks=latency_export`),
so a hyperparameter or architecture search can optimise `deploy/latency_ms` like `val/acc`.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from src.deploy.backends import DeployVariants, targets_from_config
from src.deploy.latency import (
    count_params_flops,
    deterministic_algorithms_off,
    ort_run,
    ort_session,
)
from src.deploy.onnx_export import INPUT_NAME, OUTPUT_NAME, example_input
from src.deploy.sidecar import write_sidecar
from src.deploy.trained_net import net_state_dict
from src.utils.errors import AutoclsError
from src.utils.machine import describe_machine

log = logging.getLogger(__name__)


class LatencyExport(pl.Callback):
    """Exports the best checkpoint's network and measures it on the configured targets.

    In `on_fit_end` (after every callback's `on_train_end`, so an EMA/SWA average is final):

    1. the weights of the best checkpoint (`trainer.checkpoint_callback.best_model_path`; the current
       weights when there is none) go into a CPU copy of `pl_module.net`;
    2. `<output_dir>/model.onnx` is exported (dynamic batch) and checked against PyTorch with
       onnxruntime (max abs difference <= `verify_atol`), and `model.json` beside it records the
       data description (class names, image size, mean, std, channels) and the export settings;
    3. every target (backend, precision, device, threads, batch size; see `src.deploy.backends`) is
       timed; targets this machine cannot run (a cuda target on a CPU-only machine) are skipped with
       a warning and listed in `latency.json`;
    4. `<output_dir>/latency.json` holds the results with `describe_machine()`, and
       `deploy/latency_ms` (median of the first target), `deploy/params_m`, `deploy/mflops` (FLOPs of
       one image, FlopCounterMode), and `deploy/latency_ms/<target>` for each target go to the
       loggers and into `trainer.callback_metrics`, so `train()` returns them;
    5. with `accuracy_split`, `deploy/acc` is the top-1 on that split of the model the first measured
       target runs (the INT8 graph for an int8 target, through onnxruntime), so a search that trades
       accuracy for speed scores a quantised model by its own accuracy, not its fp32 original's.

    Args:
        output_dir: Folder for model.onnx, model.json (and model.int8.onnx for int8 targets) and latency.json.
        targets: Dicts with `LatencyTarget` fields (backend, precision, device, threads, batch_size).
        warmup: Untimed calls before timing each target.
        repeats: Timed calls per target.
        calibration_images: Training images for INT8 calibration (used only by int8 targets).
        verify_atol: Largest allowed |onnxruntime - torch| on the export check.
        dynamo: PyTorch's torch.export-based ONNX exporter (false: the legacy TorchScript one).
        accuracy_split: Data split (`val`, `test`) on which to score the deployed model (null: not scored).
        accuracy_images: Score on this many images of it, drawn at random (seeded); null: all.
    """

    def __init__(
        self,
        output_dir: str,
        targets: Sequence[dict] = ({"backend": "onnxruntime", "threads": 1, "batch_size": 1},),
        warmup: int = 10,
        repeats: int = 50,
        calibration_images: int = 256,
        verify_atol: float = 1e-4,
        dynamo: bool = True,
        accuracy_split: str | None = None,
        accuracy_images: int | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.targets = targets_from_config(targets)  # unknown names fail now, not after training
        if not self.targets:
            raise AutoclsError("callbacks.latency_export.targets is empty; list at least one target to measure.")
        self.warmup, self.repeats = warmup, repeats
        self.calibration_count, self.verify_atol, self.dynamo = calibration_images, verify_atol, dynamo
        if accuracy_split not in (None, "train", "val", "test"):
            raise AutoclsError(f"callbacks.latency_export.accuracy_split={accuracy_split} is not a data split; "
                               "use val, test, train or null.")
        self.accuracy_split, self.accuracy_images = accuracy_split, accuracy_images

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "describe"):
            raise AutoclsError("LatencyExport needs the run's data module (image size, normalisation); fit with one.")
        data = datamodule.describe()
        input_shape = (int(data["in_chans"]), int(data["image_size"]), int(data["image_size"]))
        checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        net = self._best_net(pl_module, checkpoint)

        needs_int8 = any(t.precision == "int8" for t in self.targets)
        calibration = None
        if needs_int8:
            from src.deploy.images import calibration_images

            calibration = calibration_images(datamodule, self.calibration_count)
        variants = DeployVariants(net, input_shape, self.output_dir, calibration=calibration,
                                  verify_atol=self.verify_atol, dynamo=self.dynamo)
        onnx_path = variants.onnx("fp32")
        write_sidecar(onnx_path, data, self._export_settings(checkpoint, variants.max_abs_diff),
                      crop_pct=getattr(datamodule, "crop_pct", None))
        params, flops = count_params_flops(variants.net, example_input(input_shape, 1))

        results, skipped = [], []
        for target in self.targets:
            reason = target.unavailable_reason()
            if reason:
                log.warning(f"LatencyExport: skipping {target.name} ({reason}).")
                skipped.append({"target": target.as_dict(), "reason": reason})
                continue
            result = variants.measure(target, warmup=self.warmup, repeats=self.repeats)
            results.append((target, result))
            log.info(f"LatencyExport: {target.name} median {result.median_ms:.3f} ms, p90 {result.p90_ms:.3f} ms")

        metrics = {"deploy/params_m": params / 1e6, "deploy/mflops": flops / 1e6}
        deployed = None
        if results:
            metrics["deploy/latency_ms"] = results[0][1].median_ms
            metrics.update({f"deploy/latency_ms/{t.name}": r.median_ms for t, r in results})
            deployed = self._score_deployed(variants, results[0][0], datamodule)
            if deployed.get("top1") is not None:
                metrics["deploy/acc"] = deployed["top1"]
        self._write_json(onnx_path, checkpoint, input_shape, params, flops, variants.max_abs_diff, results, skipped,
                         deployed)
        self._report(trainer, metrics)

    # --- parts ----------------------------------------------------------------------------------
    @staticmethod
    def _best_net(pl_module: pl.LightningModule, checkpoint: str | None) -> nn.Module:
        net = getattr(pl_module, "net", None)
        if not isinstance(net, nn.Module):
            raise AutoclsError(
                f"LatencyExport exports the LightningModule's `net`, which {type(pl_module).__name__} lacks; "
                "remove callbacks.latency_export for this model."
            )
        net = copy.deepcopy(getattr(net, "_orig_mod", net)).cpu().eval()
        if checkpoint:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
            net.load_state_dict(net_state_dict(state))
            log.info(f"LatencyExport: exporting the weights of {checkpoint}")
        else:
            log.info("LatencyExport: no best checkpoint; exporting the current weights")
        return net

    def _score_deployed(self, variants: DeployVariants, target, datamodule) -> dict:
        """The file the first measured target runs and, with `accuracy_split`, its top-1 there. Scored on
        the CPU: the INT8 graph of an int8 target, the fp32 graph for other onnxruntime/TensorRT targets
        (fp16 differs from it by rounding only), the eager (or torch.ao INT8) module for torch targets."""
        from src.deploy.images import split_images, top1_accuracy

        precision = "int8" if target.precision == "int8" else "fp32"
        model_path = variants.onnx(precision) if target.backend != "torch" else None
        deployed = {"target": target.name, "model": str(model_path) if model_path else None}
        if not self.accuracy_split:
            return deployed
        if self.accuracy_split not in datamodule.splits:
            raise AutoclsError(f"callbacks.latency_export.accuracy_split={self.accuracy_split} is not a split of "
                               f"this data ({', '.join(datamodule.splits)}); use one of them or null.")
        images, labels = split_images(datamodule, self.accuracy_split, self.accuracy_images)
        if model_path is not None:
            session = ort_session(model_path)
            predict = partial(ort_run, session)
        else:
            predict = variants.torch_model(precision)
        with deterministic_algorithms_off():  # quantised kernels refuse to run under it
            top1 = top1_accuracy(predict, images, labels)
        log.info(f"LatencyExport: {target.name} top-1 {top1:.4f} on {len(labels)} {self.accuracy_split} images")
        return {**deployed, "accuracy_split": self.accuracy_split, "images": len(labels), "top1": top1}

    def _export_settings(self, checkpoint: str | None, max_abs_diff: float | None) -> dict:
        return {
            "format": "onnx",
            "precision": "fp32",
            "exporter": "dynamo" if self.dynamo else "torchscript",
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "dynamic_batch": True,
            "checkpoint": checkpoint,
            "max_abs_diff": max_abs_diff,
            "torch_version": torch.__version__,
        }

    def _write_json(self, onnx_path, checkpoint, input_shape, params, flops, max_abs_diff, results, skipped,
                    deployed=None) -> None:
        report = {
            "machine": describe_machine(),
            "model": str(onnx_path),
            "checkpoint": checkpoint,
            "input_shape": list(input_shape),
            "params": params,
            "flops": flops,
            "onnx_max_abs_diff": max_abs_diff,
            "results": [{"target": t.as_dict(), "name": t.name, **r.as_dict()} for t, r in results],
            "skipped": skipped,
            # what the first measured target runs (model file, accuracy): the model a search scores
            "deployed": deployed,
        }
        path = self.output_dir / "latency.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        log.info(f"LatencyExport: wrote {onnx_path} and {path}")

    @staticmethod
    def _report(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        # callback_metrics is what train() returns and what a sweep reads its objective from
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
