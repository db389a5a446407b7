"""The training task: build everything from the config, fit, test the best checkpoint, report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from src.callbacks.run_metadata import RunMetadata
from src.utils.checkpoints import check_compatible, load_checkpoint
from src.utils.instantiate import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_model,
    build_trainer,
    config_to_dict,
    resolve_ckpt_path,
)
from src.utils.loggers import finish_loggers
from src.utils.reporting import log_hyperparameters, report_metrics, write_skipped_files

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (and test) the configured model; returns the final metrics, also written to
    `<run dir>/metrics.json`. `cfg.optimized_metric` names the one a sweep optimises."""
    start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule.num_classes)
    callbacks = build_callbacks(cfg) + [RunMetadata(config_to_dict(cfg))]
    loggers = build_loggers(cfg)
    try:
        trainer = build_trainer(cfg, callbacks=callbacks, logger=loggers or False)
        log_hyperparameters(trainer, cfg, model)

        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir)
        if ckpt_path:
            check_compatible(load_checkpoint(ckpt_path), model, ckpt_path, datamodule.num_classes)
            log.info(f"Resuming from {ckpt_path}")

        metrics: dict[str, float] = {}
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
            metrics.update(_scalars(trainer.callback_metrics))
            metrics["epochs"] = trainer.current_epoch  # epochs trained (fewer when stopped early or pruned)
        write_skipped_files(datamodule, output_dir)

        if cfg.get("test", True):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") if cfg.get("train", True) else ckpt_path
            if not best:
                log.warning("No best checkpoint was saved; testing the current weights.")
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
            metrics.update(_scalars(trainer.callback_metrics, prefix="test/"))
            if best:
                metrics["best_ckpt"] = best

        metrics["wall_time_s"] = round(time.perf_counter() - start, 2)
        report_metrics(metrics, output_dir, keys=("val/acc", "val/acc_best", "test/acc"))
        return metrics
    finally:  # a W&B run left open would swallow the next run of this process (a sweep trial, a test)
        finish_loggers(loggers)


def _scalars(callback_metrics: dict, prefix: str = "") -> dict[str, float]:
    return {k: float(v) for k, v in callback_metrics.items() if k.startswith(prefix)}
