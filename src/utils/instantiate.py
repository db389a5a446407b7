"""Building the run's objects from the composed config, in one place for train and eval."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig):
    """The data module with its augmentation; fills `cfg.data.num_classes` from the data when the
    config leaves it null, so `${data.num_classes}` resolves for the network."""
    augmentation = instantiate(cfg.augmentation) if cfg.get("augmentation") else None
    datamodule = instantiate(cfg.data, augmentation=augmentation, _convert_="all")
    with open_dict(cfg):
        cfg.data.num_classes = datamodule.num_classes
    return datamodule


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
