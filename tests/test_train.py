"""End-to-end behaviour of the training and evaluation tasks on the default digits run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from src.callbacks.finite_loss import NonFiniteLossError
from src.eval import evaluate
from src.train import train

# the headline metrics a resumed run must reproduce exactly
RESUME_KEYS = ("val/acc", "val/loss", "val/acc_best", "test/acc", "test/loss", "train/loss_epoch")


def test_default_run_reaches_accuracy_bar_and_writes_outputs(compose_train, tmp_path):
    """`python train.py` (digits, SmallCNN): >= 0.98 val accuracy, and the run dir holds what users expect."""
    metrics = train(compose_train())
    assert metrics["val/acc_best"] >= 0.98
    assert metrics["val/acc"] >= 0.98
    assert metrics["test/acc"] >= 0.97
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test/acc"] == pytest.approx(metrics["test/acc"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert metrics["best_ckpt"].startswith(str(tmp_path / "checkpoints" / "epoch_"))
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["autocls"]["data"]["class_names"] == [str(i) for i in range(10)]
    assert ckpt["autocls"]["config"]["model"]["net"]["num_classes"] == 10


def test_last_checkpoint_is_the_newest_epoch_even_without_improvement(compose_train, tmp_path):
    """`ckpt_path=last` must resume from the last epoch, not from the last improvement: with mode=min on
    val/acc only epoch 0 "improves", yet last.ckpt has to come from the final epoch."""
    train(compose_train(["trainer.max_epochs=3", "callbacks.model_checkpoint.mode=min", "test=false"]))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["epoch_000.ckpt", "last.ckpt"]


def test_eval_reproduces_the_test_metrics_of_fit(compose_train, compose_eval, tmp_path):
    """eval.py on the best checkpoint gives exactly the test metrics that train.py reported."""
    fit = train(compose_train(["trainer.max_epochs=3"], out=tmp_path / "fit"))
    ev = evaluate(compose_eval([f"ckpt_path={fit['best_ckpt']}"], out=tmp_path / "eval"))
    for key in ("test/acc", "test/acc_top5", "test/loss"):
        assert ev[key] == pytest.approx(fit[key], abs=1e-6), key
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/acc"] == pytest.approx(fit["test/acc"])


class _StopAt(pl.Callback):
    """Sends this process SIGTERM (as a cluster pre-emption would) after a given training batch."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_mid_epoch_then_resume_matches_uninterrupted_run(compose_train, tmp_path):
    """Killed in the middle of epoch 1, resumed with ckpt_path=last: same final metrics and weights as a
    run that was never interrupted (same seed, CPU, dropout + augmentation randomness included)."""
    overrides = ["trainer.max_epochs=3", "augmentation=standard"]
    full = train(compose_train(overrides, out=tmp_path / "full"))

    cfg = compose_train(overrides, out=tmp_path / "logs" / "train" / "runs" / "interrupted")
    with open_dict(cfg):
        cfg.callbacks["stop"] = {"_target_": f"{__name__}._StopAt", "epoch": 1, "batch": 7}
    with pytest.raises(SystemExit):
        train(cfg)
    last = tmp_path / "logs" / "train" / "runs" / "interrupted" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, weights_only=False)["global_step"] == 19 + 8  # 19 batches/epoch, stopped after 8

    resume = [*overrides, "ckpt_path=last", f"paths.log_dir={tmp_path / 'logs'}"]
    resumed = train(compose_train(resume, out=tmp_path / "resumed"))
    for key in RESUME_KEYS:
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key
    final = lambda d: torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in final(tmp_path / "full").items():
        torch.testing.assert_close(final(tmp_path / "resumed")[name], value, rtol=0, atol=1e-6, msg=name)


class _PoisonWeights(pl.Callback):
    """Makes the network produce NaN from a given epoch on (a stand-in for a diverging run)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 3:
            with torch.no_grad():
                pl_module.net.get_classifier().weight.fill_(float("nan"))


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(compose_train, tmp_path):
    cfg = compose_train(["trainer.max_epochs=4"])
    with open_dict(cfg):
        cfg.callbacks["poison"] = {"_target_": f"{__name__}._PoisonWeights", "epoch": 2}
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert "nan" in message and "epoch 2" in message and "optimizer.lr" in message and "\n" not in message
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1  # written at the end of epoch 1, before the divergence
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
