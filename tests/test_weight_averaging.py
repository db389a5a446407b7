"""EMA and SWA callbacks: the averages against their closed forms on a scripted network, and on the
default digits run what validation, checkpoints, the final test and a resumed run get."""

from __future__ import annotations

import math
import zlib

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.callbacks.ema import EMA
from src.callbacks.swa import SWA
from src.train import train
from src.utils.instantiate import build_datamodule

DEFAULT_CALLBACKS = ("model_checkpoint", "finite_loss", "checkpoint_on_interrupt", "rng_state")
INPUTS = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))  # 4 batches of 2 per epoch


def _value(key: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random value for state entry `name` at time `key` (integer entries: `key`)."""
    if not like.is_floating_point():
        return torch.tensor(key, dtype=like.dtype)
    gen = torch.Generator().manual_seed(1000 * key + zlib.crc32(name.encode()) % 1000)
    return torch.randn(like.shape, generator=gen)


class _Scripted(pl.LightningModule):
    """Before optimizer step t of epoch e, every entry of `net.state_dict()` is set to
    `_value(key(e, t), ...)`; the loss has zero gradients, so the step leaves the values there and an
    average of them has a closed form. Records the learning rate of every step."""

    def __init__(self, key=lambda epoch, step: step) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        self.key, self.lrs = key, []

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        key = self.key(self.trainer.current_epoch, self.trainer.global_step + 1)
        with torch.no_grad():
            for name, t in self.net.state_dict().items():
                t.copy_(_value(key, name, t))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        return sum(p.sum() for p in self.net.parameters()) * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _Data(pl.LightningDataModule):
    """INPUTS in batches of 2 (no validation data). The transfer hook doubles them (a stand-in for
    normalisation) and, while training, adds 100 (a stand-in for augmentation)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(INPUTS), batch_size=2)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        (x,) = batch
        return [2 * x + (100 if self.trainer.training else 0)]


def _fit(module: pl.LightningModule, callback: pl.Callback, epochs: int) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=_Data())


@pytest.mark.parametrize("every_n_steps", [1, 3])
def test_ema_equals_closed_form_recursion(every_n_steps):
    """8 steps with known weights: e = w_t at the first update, then e = d_t e + (1 - d_t) w_t with
    d_t = min(decay, (1 + t) / (10 + t)); floats (BN running stats included) averaged, counters copied."""
    module = _Scripted()
    _fit(module, EMA(decay=0.9, warmup=True, every_n_steps=every_n_steps), epochs=2)
    state = module.net.state_dict()
    expected = None
    for t in range(every_n_steps, 9, every_n_steps):
        w = {k: _value(t, k, v) for k, v in state.items()}
        d = min(0.9, (1 + t) / (10 + t))
        expected = w if expected is None else {k: d * expected[k] + (1 - d) * w[k] if w[k].is_floating_point() else w[k] for k in w}
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["constant", "cyclic"])
def test_swa_averages_known_weights_sets_lr_and_recomputes_bn(mode):
    """Epochs 1 to 3 are averaged (epoch 0 is not): the result is the plain mean of their three weight
    sets, BN statistics are those of the averaged network on the data as the transfer hook prepares it
    for evaluation (recomputed at the end of each epoch here: no validation), and the lr follows the SWA
    schedule."""
    module = _Scripted(key=lambda epoch, step: epoch)
    if mode == "cyclic":
        swa = SWA(swa_lr=0.01, cycle_lr=0.1, swa_start_epoch=1)
        swa_lrs = [0.1 * (1 - t) + 0.01 * t for t in (0.25, 0.5, 0.75, 1.0)] * 3
    else:
        swa = SWA(swa_lr=0.01, swa_start_epoch=1, anneal_epochs=1)
        anneal = [(1 - math.cos(math.pi * i / 4)) / 2 for i in range(4)]
        swa_lrs = [(1 - w) * 0.5 + w * 0.01 for w in anneal] + [0.01] * 8
    _fit(module, swa, epochs=4)

    assert module.lrs == pytest.approx([0.5] * 4 + swa_lrs)
    state = module.net.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        mean = sum(_value(epoch, name, state[name]) for epoch in (1, 2, 3)) / 3
        torch.testing.assert_close(state[name], mean, msg=name)
    with torch.no_grad():
        features = module.net[0](2 * INPUTS)  # what the BN layer sees with the averaged weights
    torch.testing.assert_close(state["1.running_mean"], features.mean(0))


@pytest.mark.parametrize("name", ["ema", "swa"])
def test_callback_configs_keep_the_default_callbacks(compose_train, name):
    cfg = compose_train([f"callbacks={name}"])
    assert set(DEFAULT_CALLBACKS) | {name} <= set(cfg.callbacks)
    assert isinstance(instantiate(cfg.callbacks[name]), EMA)


def _val_loss(cfg, state_dict: dict) -> float:
    """The validation loss of the weights `state_dict`, computed here rather than by the trainer."""
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    model = instantiate(cfg.model)
    model.load_state_dict(state_dict)
    model.eval()
    val = datamodule.splits["val"]
    with torch.no_grad():
        return float(model.loss_fn(model(datamodule.normalize(val.images.float() / 255)), val.labels))


def _checkpoint(run_dir, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=False)


def test_ema_run_validates_and_saves_the_average(compose_train, tmp_path):
    """Digits run with callbacks=ema: the logged val loss is that of the checkpoint's state_dict (the EMA),
    not that of the raw weights kept in the callback's state."""
    cfg = compose_train(["callbacks=ema", "trainer.max_epochs=3"])
    metrics = train(cfg)
    assert metrics["val/acc"] > 0.9 and metrics["test/acc"] > 0.9
    last = _checkpoint(tmp_path)
    ema, raw = last["state_dict"], last["callbacks"]["EMA"]["raw"]
    assert last["callbacks"]["EMA"]["updates"] == 3 * 19
    assert metrics["val/loss"] == pytest.approx(_val_loss(cfg, ema), abs=1e-5)
    assert abs(metrics["val/loss"] - _val_loss(cfg, {**ema, **{f"net.{k}": v for k, v in raw.items()}})) > 1e-3


def test_ema_resumed_mid_epoch_ends_like_the_uninterrupted_run(compose_train, tmp_path):
    """Killed by SIGTERM in the middle of epoch 1 and resumed with ckpt_path=last: the same average (the
    checkpoint's state_dict) and raw weights (the callback's state) as a run never interrupted."""
    overrides = ["callbacks=ema", "trainer.max_epochs=2", "+trainer.limit_train_batches=6", "test=false"]
    full = train(compose_train(overrides, out=tmp_path / "full"))

    run_dir = tmp_path / "logs" / "train" / "runs" / "interrupted"
    cfg = compose_train(overrides, out=run_dir)
    with open_dict(cfg):
        # SIGTERM after batch 2 of epoch 1 (test_train.py's pre-emption stand-in)
        cfg.callbacks["stop"] = {"_target_": "test_train._StopAt", "epoch": 1, "batch": 2}
    with pytest.raises(SystemExit):
        train(cfg)
    assert _checkpoint(run_dir)["callbacks"]["EMA"]["updates"] == 6 + 3
    resumed = train(compose_train([*overrides, "ckpt_path=last", f"paths.log_dir={tmp_path / 'logs'}"],
                                  out=tmp_path / "resumed"))

    assert resumed["val/loss"] == pytest.approx(full["val/loss"], abs=1e-6)
    expected, end = _checkpoint(tmp_path / "full"), _checkpoint(tmp_path / "resumed")
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(end["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    for name, value in expected["callbacks"]["EMA"]["raw"].items():
        torch.testing.assert_close(end["callbacks"]["EMA"]["raw"][name], value, rtol=0, atol=1e-6, msg=name)


def test_swa_run_tests_and_saves_the_final_average(compose_train, tmp_path):
    """Digits run with callbacks=swa from epoch 1 (pad-crop augmentation): the tested "best" checkpoint
    is the final one, holding the average whose first BatchNorm statistics were recomputed on the
    normalised, un-augmented training images (not the raw model's running statistics)."""
    overrides = ["callbacks=swa", "callbacks.swa.swa_start_epoch=1", "trainer.max_epochs=3",
                 "augmentation=standard", "augmentation.ops.crop.padding=1", "augmentation.ops.hflip=null"]
    cfg = compose_train(overrides)
    metrics = train(cfg)
    assert metrics["val/acc"] > 0.9 and metrics["test/acc"] > 0.9
    assert metrics["best_ckpt"].endswith("epoch_002.ckpt")
    last = _checkpoint(tmp_path)
    best = _checkpoint(tmp_path, "epoch_002.ckpt")
    for name, value in last["state_dict"].items():
        assert torch.equal(best["state_dict"][name], value), name
    assert last["callbacks"]["SWA"]["updates"] == 2
    assert metrics["val/loss"] == pytest.approx(_val_loss(cfg, last["state_dict"]), abs=1e-5)

    datamodule = build_datamodule(cfg)
    datamodule.setup()
    model = instantiate(cfg.model)
    model.load_state_dict(last["state_dict"])
    with torch.no_grad():
        conv = model.net.features[0][0](datamodule.normalize(datamodule.splits["train"].images.float() / 255))
    expected = conv.mean((0, 2, 3))
    swa_error = (last["state_dict"]["net.features.0.1.running_mean"] - expected).abs().max()
    raw_error = (last["callbacks"]["SWA"]["raw"]["features.0.1.running_mean"] - expected).abs().max()
    # the BN pass used all but the last partial batch of the training split
    assert swa_error < 1e-3 < raw_error
