"""FreezeBackbone and FixRes on the default digits run: which weights move in which epochs, and what
resolution the network sees."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from torchvision.transforms import v2

from src.augment.pipeline import Augmentation
from src.callbacks.fix_res import resize_center_crop
from src.callbacks.freeze_backbone import freeze
from src.train import train

DEFAULT_CALLBACKS = ("model_checkpoint", "finite_loss", "checkpoint_on_interrupt", "rng_state")
# SGD with momentum and weight decay: both would move parameters that got a zero gradient
FAST_SGD = ["optimizer=sgd", "trainer.max_epochs=2", "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2",
            "test=false"]


class _Probe(pl.Callback):
    """Records `net.state_dict()` at the start of training and at the end of every epoch, and the input
    size of every forward pass by epoch and mode. `_Probe.last` is the newest instance."""

    last: _Probe

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.inputs: set[tuple[int, bool, tuple[int, int]]] = set()
        self.trainable_after_fit: bool | None = None
        self.augmentation_after_fit = None
        _Probe.last = self

    def _snapshot(self, pl_module) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})

    def on_fit_start(self, trainer, pl_module) -> None:
        def record(net, args):
            self.inputs.add((trainer.current_epoch, net.training, tuple(args[0].shape[-2:])))

        pl_module.net.register_forward_pre_hook(record)

    def on_train_start(self, trainer, pl_module) -> None:
        self._snapshot(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._snapshot(pl_module)

    def teardown(self, trainer, pl_module, stage) -> None:  # after the callbacks under test tore down
        self.trainable_after_fit = all(p.requires_grad for p in pl_module.net.parameters())
        self.augmentation_after_fit = trainer.datamodule.augmentation


def _run_with_probe(compose_train, overrides: list[str]) -> _Probe:
    cfg = compose_train(overrides)
    with open_dict(cfg):
        cfg.callbacks["probe"] = {"_target_": f"{__name__}._Probe"}
    train(cfg)
    return _Probe.last


def _changed(before: dict, after: dict) -> set[str]:
    return {name for name, value in after.items() if not torch.equal(before[name], value)}


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
def test_frozen_parameters_escape_momentum_and_weight_decay(optimizer):
    """A parameter frozen mid-training, with optimizer state and a gradient, does not move even when the
    gradient is zeroed rather than cleared (zero_grad(set_to_none=False))."""
    kwargs = {"momentum": 0.9} if optimizer is torch.optim.SGD else {}
    w = torch.nn.Parameter(torch.ones(3))
    opt = optimizer([w], lr=0.1, weight_decay=0.1, **kwargs)
    w.grad = torch.ones(3)
    opt.step()
    freeze([w])
    opt.zero_grad(set_to_none=False)
    before = w.detach().clone()
    opt.step()
    assert torch.equal(w.detach(), before) and not w.requires_grad


@pytest.mark.parametrize("name", ["freeze_backbone", "fix_res"])
def test_callback_configs_keep_the_default_callbacks(compose_train, name):
    assert set(DEFAULT_CALLBACKS) | {name} <= set(compose_train([f"callbacks={name}"]).callbacks)


def test_freeze_backbone_trains_only_the_classifier_then_everything(compose_train):
    """SmallCNN: `fc` is the classifier. During the frozen epoch every other weight and BN statistic
    stays bit-identical despite SGD momentum and weight decay; after it, they train."""
    probe = _run_with_probe(compose_train, ["callbacks=freeze_backbone", "callbacks.freeze_backbone.epochs=1", *FAST_SGD])
    start, frozen_epoch, thawed_epoch = probe.states
    assert _changed(start, frozen_epoch) == {"fc.weight", "fc.bias"}
    assert {"features.0.0.weight", "features.0.1.running_mean", "features.3.0.weight"} <= _changed(frozen_epoch, thawed_epoch)
    assert probe.trainable_after_fit


def test_fix_res_trains_classifier_and_bn_on_test_views_at_test_size(compose_train):
    """digits (8x8) with pad-crop augmentation, FixRes at 12x12 in the last epoch: the network trains on
    8x8 crops first, on 12x12 test views in the FixRes epoch, and is evaluated at 12x12; in that epoch
    only the classifier and BatchNorm (weights and statistics) change. Afterwards the augmentation and
    trainability are back."""
    probe = _run_with_probe(compose_train, ["callbacks=fix_res", "callbacks.fix_res.test_size=12",
                                            "augmentation=standard", *FAST_SGD])
    assert probe.inputs == {(0, True, (8, 8)), (0, False, (12, 12)), (1, True, (12, 12)), (1, False, (12, 12))}
    _, before, after = probe.states
    batch_norm = {f"features.{i}.1.{k}" for i in (0, 1, 3) for k in ("weight", "bias", "running_mean", "running_var",
                                                                     "num_batches_tracked")}
    assert _changed(before, after) == {"fc.weight", "fc.bias"} | batch_norm
    assert isinstance(probe.augmentation_after_fit, Augmentation) and probe.trainable_after_fit


@pytest.mark.parametrize(("size", "crop_pct", "shape"), [(12, 1.0, (10, 14)), (6, 0.75, (9, 8)), (8, 1.0, (8, 8))])
def test_resize_center_crop_matches_torchvision_eval_transform(size, crop_pct, shape):
    images = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    reference = v2.Compose([v2.Resize(round(size / crop_pct), antialias=True), v2.CenterCrop(size)])(images)
    torch.testing.assert_close(resize_center_crop(images, size, crop_pct), reference)
