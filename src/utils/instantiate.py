"""Building the run's objects from the composed config, in one place for train and eval."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from src.utils.errors import AutoclsError, ConfigError, find_user_error

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig):
    """The data module with its augmentation; fills `cfg.data.num_classes` from the data when the
    config leaves it null, so `${data.num_classes}` resolves for the network."""
    augmentation = instantiate(cfg.augmentation) if cfg.get("augmentation") else None
    datamodule = instantiate(cfg.data, augmentation=augmentation, _convert_="all")
    with open_dict(cfg):
        cfg.data.num_classes = datamodule.num_classes
    return datamodule


def build_model(cfg: DictConfig, num_classes: int) -> pl.LightningModule:
    """The LightningModule of `cfg.model`, checked against the data's class count: a network overridden to
    another size (`model.net.num_classes=3` on 10 classes) would otherwise fail at the first loss with an
    index error deep inside torch."""
    model = instantiate(cfg.model)
    net_classes = getattr(getattr(model, "net", None), "num_classes", None)
    if isinstance(net_classes, int) and net_classes != num_classes:
        raise ConfigError(
            f"model.net.num_classes={net_classes} but the data has {num_classes} classes; drop the override (the "
            "network follows data.num_classes) or point data.data_dir at the data with that many classes."
        )
    return model


def build_trainer(cfg: DictConfig, **kwargs) -> pl.Trainer:
    """The configured `pl.Trainer` (`kwargs`: callbacks, logger). Settings Lightning refuses (a GPU trainer
    on a machine without one, an unknown precision, too many devices) end in one sentence naming the
    override to change, instead of Hydra's wrapped traceback."""
    import torch
    from hydra.errors import InstantiationException
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} needs a CUDA GPU and torch sees none here; use trainer=cpu, or check "
            "CUDA_VISIBLE_DEVICES and that torch is a CUDA build."
        )
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or accumulate < 1:
        raise AutoclsError(f"trainer.accumulate_grad_batches={accumulate} must be a whole number >= 1 (1: no accumulation).")
    try:
        return instantiate(cfg.trainer, **kwargs)
    except InstantiationException as err:
        known = find_user_error(err)  # e.g. a key the Trainer does not take, named with its close spellings
        if known is not None:
            raise known from err
        cause = err.__cause__
        if not isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            raise
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise AutoclsError(f"Lightning refuses the trainer settings ({reason}); fix the trainer.* override.") from err


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str | Path) -> str | None:
    """`None`, an existing checkpoint file, or `last`: the newest `runs/*/checkpoints/last.ckpt` under
    `log_dir` (by modification time). Anything else is a one-sentence error."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        found = list(Path(log_dir).glob("**/checkpoints/last.ckpt"))
        if not found:
            raise AutoclsError(
                f"ckpt_path=last found no checkpoints/last.ckpt under {log_dir}; pass the checkpoint's path instead."
            )
        newest = max(found, key=lambda p: p.stat().st_mtime)
        log.info(f"ckpt_path=last -> {newest}")
        return str(newest)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise AutoclsError(f"Checkpoint {path} does not exist; pass an existing file or ckpt_path=last.")
    return str(path)


def config_to_dict(cfg: DictConfig) -> dict:
    """The config as plain data with interpolations resolved (what checkpoints and logs store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
