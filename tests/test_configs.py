"""Config groups compose into runnable setups (loggers, trainers, debug modes, precision)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from src.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp"])
def test_trainer_configs_compose(compose_train, trainer):
    cfg = compose_train([f"trainer={trainer}"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if trainer in ("gpu", "ddp"):
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    else:
        instantiate(cfg.trainer)  # a CPU trainer can be built here


@pytest.mark.parametrize("debug", sorted(p.stem for p in (CONFIGS / "debug").glob("*.yaml")))
def test_debug_modes_run(compose_train, debug):
    cfg = compose_train([f"debug={debug}", "trainer.max_epochs=2"])
    with open_dict(cfg):
        cfg.trainer.check_val_every_n_epoch = 1
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_wandb_and_tensorboard_loggers_write_offline(compose_train, tmp_path, monkeypatch):
    """logger=wandb runs offline without an account (no network), beside csv and TensorBoard files."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    for logger in ("wandb", "tensorboard"):
        out = tmp_path / logger
        train(compose_train([f"logger={logger}", "trainer.max_epochs=1", "test=false"], out=out))
        assert (out / "csv" / "metrics.csv").is_file()
    assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    import wandb

    assert wandb.run is None  # train() ended its W&B run: the next run of this process starts its own
    assert list((tmp_path / "tensorboard" / "tensorboard").rglob("events.out.tfevents.*"))


def test_bf16_mixed_precision_and_gradient_clipping_train(compose_train):
    metrics = train(compose_train(["trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0",
                                   "trainer.max_epochs=3"]))
    assert metrics["val/acc_best"] >= 0.9


class _CtrlC(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 2:
            raise KeyboardInterrupt


def test_ctrl_c_saves_last_checkpoint(compose_train, tmp_path):
    cfg = compose_train(["trainer.max_epochs=3"])
    with open_dict(cfg):
        cfg.callbacks["ctrl_c"] = {"_target_": f"{__name__}._CtrlC"}
    with pytest.raises(SystemExit):
        train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 19 + 3 and ckpt["autocls"]["data"]["num_classes"] == 10


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """trainer=ddp with 2 CPU processes (gloo; SyncBatchNorm needs GPUs): both ranks share one run dir."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.precision=32-true", "trainer.sync_batchnorm=false", "trainer.max_epochs=2",
         f"paths.log_dir={tmp_path}", "logger=none",
         "~callbacks.rich_progress_bar"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list(tmp_path.glob("train/runs/*"))
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0


@pytest.mark.slow
def test_torch_compile_and_gradient_accumulation_train(compose_train):
    """model.compile=true (inductor on CPU) with accumulated gradients still learns the digits."""
    metrics = train(compose_train(["model.compile=true", "trainer.accumulate_grad_batches=2", "trainer.max_epochs=4"]))
    assert metrics["val/acc_best"] >= 0.9


def test_channels_last_trains_and_predicts_like_the_default_layout(compose_train, tmp_path):
    """model.channels_last=true changes the memory layout only: the same seed gives the same accuracy."""
    default = train(compose_train(["trainer.max_epochs=2"], out=tmp_path / "nchw"))
    nhwc = train(compose_train(["trainer.max_epochs=2", "model.channels_last=true"], out=tmp_path / "nhwc"))
    assert nhwc["val/acc"] == pytest.approx(default["val/acc"], abs=0.02)
    assert nhwc["val/acc_best"] >= 0.9
    conv = lambda d: next(v for v in torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"].values()
                          if v.ndim == 4 and v.shape[1] > 1 and v.shape[-1] > 1)  # layouts differ only then
    assert conv(tmp_path / "nhwc").is_contiguous(memory_format=torch.channels_last)
    assert not conv(tmp_path / "nchw").is_contiguous(memory_format=torch.channels_last)
