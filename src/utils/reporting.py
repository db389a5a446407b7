"""What a run tells its user and its loggers."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from src.utils.instantiate import config_to_dict

log = logging.getLogger(__name__)


def log_hyperparameters(trainer: pl.Trainer, cfg: DictConfig, model: pl.LightningModule) -> None:
    """Send the composed config and parameter counts to every logger (W&B config, TensorBoard hparams)."""
    if not trainer.loggers:
        return
    hparams = config_to_dict(cfg)
    hparams.pop("hydra", None)
    hparams["model/params_total"] = sum(p.numel() for p in model.parameters())
    hparams["model/params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)


@rank_zero_only
def write_skipped_files(datamodule, output_dir: Path) -> None:
    """List the files the data module could not use in `<run dir>/skipped_files.tsv`."""
    skipped = getattr(datamodule, "skipped_files", None)
    if not skipped:
        return
    from src.datamodules.image_files import write_skipped

    path = output_dir / "skipped_files.tsv"
    write_skipped(skipped, path)
    log.warning(f"Skipped {len(skipped)} unusable files (not images or unreadable); list in {path}")


@rank_zero_only  # under DDP every rank runs the task; one report
def report_metrics(metrics: dict, output_dir: Path, keys: Iterable[str]) -> None:
    """Write `metrics.json` and print the headline numbers and the run directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    headline = "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)
    log.info(f"{headline}  ({metrics.get('wall_time_s', 0):.1f} s)")
    log.info(f"Run directory: {output_dir}")
