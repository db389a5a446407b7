"""The evaluation task: rebuild a trained model from its checkpoint and test it."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.utils.checkpoints import check_compatible, checkpoint_metadata, load_checkpoint
from src.utils.instantiate import build_datamodule, build_loggers, resolve_ckpt_path
from src.utils.reporting import report_metrics

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test `cfg.ckpt_path` on the test split of the data it was trained on (or of `cfg.data` when the
    user chose a data config); writes `<run dir>/metrics.json` and returns the metrics."""
    start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir)
    ckpt = load_checkpoint(ckpt_path)
    run_cfg = OmegaConf.create(checkpoint_metadata(ckpt, ckpt_path)["config"])

    # evaluation never augments; the data and network come from the training run unless overridden
    data_cfg = OmegaConf.create({"data": cfg.data if cfg.get("data") else run_cfg.data, "augmentation": None})
    datamodule = build_datamodule(data_cfg)
    model = instantiate(run_cfg.model)
    check_compatible(ckpt, model, ckpt_path, datamodule.num_classes)
    del ckpt  # Lightning reads the file again to restore; don't hold two copies

    trainer: pl.Trainer = instantiate(cfg.trainer, logger=build_loggers(cfg) or False, callbacks=[])
    with warnings.catch_warnings():
        # evaluation restores only the weights; the training callbacks' states are irrelevant here
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    metrics: dict = {k: float(v) for k, v in results[0].items()}
    metrics["ckpt_path"] = ckpt_path
    metrics["wall_time_s"] = round(time.perf_counter() - start, 2)
    report_metrics(metrics, Path(cfg.paths.output_dir), keys=("test/acc", "test/acc_top5"))
    return metrics
