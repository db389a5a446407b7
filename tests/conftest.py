"""Shared test fixtures: compose the real configs with Hydra, sized for a 2-core CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(Path(__file__).parent))  # helper modules beside the tests (cifar_jpg, ...)


def compose_config(config_name: str, tmp_path: Path, overrides: list[str] = ()) -> DictConfig:
    """The config `train.py`/`eval.py` would run with `overrides`, writing into `tmp_path`, without a
    progress bar or model summary (they only slow tests down)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name,
            overrides=[f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path / 'logs'}", *overrides],
        )
    with open_dict(cfg):
        for key in ("rich_progress_bar", "model_summary"):
            if cfg.get("callbacks"):
                cfg.callbacks.pop(key, None)
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    return cfg


@pytest.fixture
def compose_train(tmp_path):
    return lambda overrides=(), out=None: compose_config("train.yaml", out or tmp_path, list(overrides))


@pytest.fixture
def compose_eval(tmp_path):
    return lambda overrides=(), out=None: compose_config("eval.yaml", out or tmp_path, list(overrides))


@pytest.fixture
def one_thread():
    """Tiny nets run thousands of small ops: a second intra-op thread gains nothing on them, and on a
    busy 2-core machine its synchronisation costs ~30x (measured: 0.3 s vs 10 s per search step)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def cifar_jpg_dir(tmp_path_factory) -> Path:
    """20 train + 20 test images per class of the shared CIFAR-10 JPEG copy, in ImageFolder layout
    (`train/<class>/`, `test/<class>/`); skips the test when the archive is not on this machine."""
    from cifar_jpg import cifar_jpg_archive, extract_cifar_jpg_subset

    archive = cifar_jpg_archive()
    if archive is None:
        pytest.skip("shared CIFAR-10 JPEG archive not found (set AUTOCLS_CIFAR_JPG to its path)")
    return extract_cifar_jpg_subset(archive, tmp_path_factory.mktemp("cifar10_jpg"), per_class=20)


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory) -> Path:
    """`last.ckpt` of a short SmallCNN digits run (1 epoch of 5 batches), written by the train task as
    a user's run would write it: for tests that load, predict with or serve a trained model."""
    from src.train import train

    out = tmp_path_factory.mktemp("digits_ckpt")
    overrides = ["trainer.max_epochs=1", "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2",
                 "logger=none", "test=false", "model.net.width=8"]
    train(compose_config("train.yaml", out, overrides))
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "last.ckpt"
