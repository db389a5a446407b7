"""The evaluation task: rebuild a trained model from its checkpoint and test it."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.evaluation.extras import EvalExtras
from src.utils.checkpoints import check_compatible, checkpoint_metadata, load_checkpoint
from src.utils.errors import AutoclsError
from src.utils.instantiate import (
    build_datamodule,
    build_loggers,
    build_trainer,
    resolve_ckpt_path,
)
from src.utils.reporting import report_metrics

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test `cfg.ckpt_path` on the test split of the data it was trained on (or of `cfg.data` when the
    user chose a data config); writes `<run dir>/metrics.json` and returns the metrics."""
    start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True)
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise AutoclsError("eval.py needs a checkpoint: pass ckpt_path=<run dir>/checkpoints/last.ckpt, or ckpt_path=last "
                           "for the newest run under paths.log_dir.")
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir)
    ckpt = load_checkpoint(ckpt_path)
    run_cfg = OmegaConf.create(checkpoint_metadata(ckpt, ckpt_path)["config"])

    # evaluation never augments; the data and network come from the training run unless overridden
    # (resolved first: detached from this config, the data node's ${paths...} would not resolve)
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else run_cfg.data
    data_cfg = OmegaConf.create({"data": data, "augmentation": None})
    datamodule = build_datamodule(data_cfg)
    # test-time augmentation: eval's `tta`, else the training run's `model.tta`; applied here (EvalExtras),
    # so the LightningModule runs plain and every test metric comes from one forward per batch
    tta = cfg.get("tta") or run_cfg.model.get("tta") or "none"
    if "tta" in run_cfg.model:
        run_cfg.model.tta = "none"
    model = instantiate(run_cfg.model)
    check_compatible(ckpt, model, ckpt_path, datamodule.num_classes)
    del ckpt  # Lightning reads the file again to restore; don't hold two copies

    # test-time augmentation, confusion matrix, per-class accuracy and calibration, in the same pass
    extras = EvalExtras(cfg.paths.output_dir, tta=tta, ece_bins=cfg.get("ece_bins", 15))
    trainer = build_trainer(cfg, logger=build_loggers(cfg) or False, callbacks=[extras])
    with warnings.catch_warnings():
        # evaluation restores only the weights; the training callbacks' states are irrelevant here
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    metrics: dict = {k: float(v) for k, v in results[0].items()}
    metrics.update(extras.metrics)
    metrics["tta"] = extras.tta
    metrics["ckpt_path"] = ckpt_path
    metrics["wall_time_s"] = round(time.perf_counter() - start, 2)
    report_metrics(metrics, Path(cfg.paths.output_dir), keys=("test/acc", "test/acc_top5", "test/ece"))
    return metrics
