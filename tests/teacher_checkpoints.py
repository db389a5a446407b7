"""Stand-in distillation teachers for tests that only check that a run works end to end.

`write_teacher_checkpoint` writes a checkpoint in `train.py`'s format (the network's weights under
`net.*` and the `autocls` metadata: network config and data description) for a freshly initialised
SmallCNN. Such a teacher is untrained: fine for a fast_dev_run of an experiment, never for a real
run (there `model.teacher_ckpt` must name a trained checkpoint; without one the run stops with a
one-sentence error).

tests/ is not a package: import with `tests/` on sys.path (conftest.py puts it there).
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.callbacks.run_metadata import CHECKPOINT_KEY


def write_teacher_checkpoint(path: Path, data: dict, width: int = 4, seed: int = 0) -> Path:
    """A SmallCNN teacher for data described by `data` (`ClassificationDataModule.describe()`)."""
    net_cfg = {
        "_target_": "src.models.small_cnn.SmallCNN",
        "num_classes": int(data["num_classes"]),
        "in_chans": int(data["in_chans"]),
        "width": width,
    }
    torch.manual_seed(seed)
    net = instantiate(net_cfg)
    checkpoint = {
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        CHECKPOINT_KEY: {"config": {"model": {"net": net_cfg}}, "data": dict(data)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def stand_in_teacher(cfg: DictConfig, directory: Path) -> Path:
    """An untrained teacher checkpoint that fits the data of the composed run config `cfg`."""
    datamodule = instantiate(OmegaConf.to_container(cfg.data, resolve=True), augmentation=None, _convert_="all")
    datamodule.setup()
    return write_teacher_checkpoint(directory / "stand_in_teacher.ckpt", datamodule.describe())
