"""The pieces of `experiment=cifar10_speedrun`: the network and its whitening layer, the optimizer's
norm-bias multiplier, lookahead, alternating flips, reflect-padded translation and flip TTA.
(The experiment itself runs in tests/test_experiments.py.)"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from src.augment.ops import PadCrop
from src.callbacks.alternating_flip import AlternatingFlip
from src.callbacks.lookahead import Lookahead
from src.callbacks.whitening import PatchWhitening
from src.datamodules.base import TensorSplit
from src.datamodules.digits import DigitsDataModule
from src.lit_models.classifier import ClassifierLitModule
from src.losses.cross_entropy import CrossEntropyLoss
from src.models.small_cnn import SmallCNN
from src.models.speedrun_net import SpeedrunNet
from src.optim.optimizers import build_optimizer
from src.utils.errors import AutoclsError


def _correlated_images(n: int = 16, size: int = 12) -> torch.Tensor:
    """Smooth random images (neighbouring pixels and channels correlate, as in photos)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, size, size, generator=gen).cumsum(-1).cumsum(-2) / size
    noise = torch.randn(2, *x.shape, generator=gen)
    return torch.cat([x, 0.8 * x + 0.2 * noise[0], 0.3 * noise[1] - 0.5 * x], dim=1)


# --- the network -------------------------------------------------------------------------------


def test_net_contract_and_shapes():
    net = SpeedrunNet(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    features = net.forward_features(x)
    assert features.shape == (2, 256, 3, 3)  # 32 -> 31 (2x2 whitening) -> 15 -> 7 -> 3
    assert net.forward_head(features, pre_logits=True).shape == (2, net.num_features) == (2, 256)
    assert torch.allclose(net(x), net.head(features.amax(dim=(2, 3))) / 9, atol=1e-6)
    # airbench94's make_net94() has the same parameters (counted by building both; the same function
    # too, given the same weights)
    assert sum(p.numel() for p in net.parameters()) == 1_972_792
    net.reset_classifier(4)
    assert net(x).shape == (2, 4) and net.get_classifier().out_features == 4
    # what trains: no whitening filters, no BN scales
    assert not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert all(m.momentum == pytest.approx(0.4) and m.eps == 1e-12 for m in norms)


def test_convs_start_as_partial_identities():
    conv = SpeedrunNet().stages[1].conv2  # 256 -> 256
    x = torch.randn(1, 256, 5, 5)
    assert torch.allclose(conv(x), x, atol=1e-6)
    first = SpeedrunNet().stages[0].conv1  # 24 -> 64: the first 24 outputs copy the input
    x = torch.randn(1, 24, 5, 5)
    assert torch.allclose(first(x)[:, :24], x, atol=1e-6)


def test_whitening_decorrelates_patches():
    """After init, the first 12 whitening outputs (bias 0) of the same images have covariance
    diag(lambda / (lambda + eps)) -- the identity up to eps -- and the other 12 are their negatives."""
    images = _correlated_images()
    net = SpeedrunNet()
    eps = 1e-3
    net.init_whitening(images, eps=eps)
    with torch.no_grad():
        out = F.conv2d(images, net.whiten.weight)  # (N, 24, H', W')
    flat = out.permute(0, 2, 3, 1).reshape(-1, 24)
    cov = flat[:, :12].T @ flat[:, :12] / len(flat)
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)
    assert torch.allclose(cov, torch.diag(eigenvalues / (eigenvalues + eps)), atol=1e-4)
    assert torch.equal(flat[:, 12:], -flat[:, :12])


# --- optimizer: the norm-bias multiplier --------------------------------------------------------


def test_norm_bias_lr_mult_scales_lr_and_divides_decay():
    net = SpeedrunNet()
    opt = build_optimizer(net, name="sgd", lr=1.5, weight_decay=0.002, no_weight_decay_norm_bias=False,
                          norm_bias_lr_mult=64.0, momentum=0.85, nesterov=True)
    norm_biases = {id(m.bias) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            seen += 1
            if id(p) in norm_biases:
                assert group["lr"] == pytest.approx(96.0) and group["weight_decay"] == pytest.approx(0.002 / 64)
            else:  # incl. the whitening bias, a conv's
                assert group["lr"] == pytest.approx(1.5) and group["weight_decay"] == pytest.approx(0.002)
    assert seen == len(list(net.parameters()))
    # the decay step lr x wd is the same for both kinds
    assert {round(g["lr"] * g["weight_decay"], 12) for g in opt.param_groups} == {0.003}


# --- callbacks -----------------------------------------------------------------------------------


class _Module(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net


def test_lookahead_update_rule():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    module = _Module(net)
    look = Lookahead(decay=0.9, every_n_steps=2, power=3.0)
    look.on_fit_start(None, module)
    w0 = net.weight.detach().clone()
    total = 8
    trainer = SimpleNamespace(global_step=1, estimated_stepping_batches=total)
    with torch.no_grad():
        net.weight.add_(1.0)
    look.on_train_batch_end(trainer, module, None, None, 0)  # step 1: no update
    assert torch.equal(net.weight, w0 + 1)
    trainer.global_step = 2
    look.on_train_batch_end(trainer, module, None, None, 1)
    d = 0.9**2 * (2 / 8) ** 3
    assert look.decay_at(2, 8) == pytest.approx(d)
    expected = d * w0 + (1 - d) * (w0 + 1)
    assert torch.allclose(net.weight, expected) and torch.allclose(look.slow["weight"], expected)
    look.on_train_batch_end(trainer, module, None, None, 1)  # the same step again (accumulation): no-op
    assert torch.allclose(net.weight, expected)
    with torch.no_grad():
        net.weight.add_(5.0)
    trainer.global_step = 7  # the last step of a run whose length is not a multiple of 2: w <- slow
    trainer.estimated_stepping_batches = 7
    look.on_train_batch_end(trainer, module, None, None, 6)
    assert torch.allclose(net.weight, expected)
    restored = Lookahead(decay=0.9, every_n_steps=2)
    restored.load_state_dict(look.state_dict())
    restored.on_fit_start(None, module)
    assert torch.equal(restored.slow["weight"], look.slow["weight"])


def _flip_trainer(images: torch.Tensor):
    datamodule = SimpleNamespace(splits={"train": TensorSplit(images, torch.zeros(len(images), dtype=torch.long))})
    return SimpleNamespace(datamodule=datamodule, current_epoch=0)


def test_alternating_flip_mirrors_every_image_every_other_epoch():
    original = torch.rand(64, 3, 4, 5)
    images = original.clone()
    trainer, flip = _flip_trainer(images), AlternatingFlip(seed=3)
    states = []
    for epoch in range(4):
        trainer.current_epoch = epoch
        flip.on_train_epoch_start(trainer, None)
        mirrored = torch.tensor([torch.equal(images[i], original[i].flip(-1)) for i in range(64)])
        assert all(torch.equal(images[i], original[i]) for i in range(64) if not mirrored[i])
        states.append(mirrored)
    assert 16 < int(states[0].sum()) < 48  # a random half starts mirrored
    assert torch.equal(states[1], ~states[0]) and torch.equal(states[2], states[0]) and torch.equal(states[3], ~states[0])
    flip.on_train_end(trainer, None)
    assert torch.equal(images, original)
    with pytest.raises(AutoclsError, match="in-memory"):
        AlternatingFlip().on_train_epoch_start(SimpleNamespace(datamodule=SimpleNamespace(splits={})), None)


def test_whitening_callback_initialises_once_and_trains_the_bias_for_the_first_epochs():
    images = (torch.rand(8, 3, 12, 12) * 255).to(torch.uint8)
    datamodule = SimpleNamespace(splits={"train": TensorSplit(images, torch.zeros(8, dtype=torch.long))},
                                 normalize=lambda x: (x - 0.5) / 0.25)
    module = _Module(SpeedrunNet())
    trainer = SimpleNamespace(datamodule=datamodule, current_epoch=0)
    callback = PatchWhitening(num_images=5, bias_epochs=2)
    callback.on_fit_start(trainer, module)
    reference = SpeedrunNet()
    chosen = torch.randperm(8, generator=torch.Generator().manual_seed(0))[:5]
    reference.init_whitening((images[chosen].float() / 255 - 0.5) / 0.25)
    assert torch.allclose(module.net.whiten.weight, reference.whiten.weight, atol=1e-5)
    resumed = PatchWhitening(num_images=5)
    resumed.load_state_dict(callback.state_dict())
    fresh = _Module(SpeedrunNet())
    before = fresh.net.whiten.weight.clone()
    resumed.on_fit_start(trainer, fresh)  # a resumed run keeps the checkpoint's whitening
    assert torch.equal(fresh.net.whiten.weight, before)
    for epoch, trains in ((0, True), (1, True), (2, False), (5, False)):
        trainer.current_epoch = epoch
        callback.on_train_epoch_start(trainer, module)
        assert module.net.whiten.bias.requires_grad is trains
    with pytest.raises(AutoclsError, match="model/net=speedrun"):
        PatchWhitening().on_fit_start(trainer, _Module(SmallCNN()))


# --- augmentation and TTA ------------------------------------------------------------------------


def test_reflect_pad_crop_takes_windows_of_the_reflected_image():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 6, 6)
    out = PadCrop(padding=2, padding_mode="reflect")(x)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    windows = {(dy, dx) for dy in range(5) for dx in range(5)}
    for i in range(32):
        assert any(torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6]) for dy, dx in windows)
    assert out.min() > 0  # no zero padding anywhere
    with pytest.raises(AutoclsError, match="constant or reflect"):
        PadCrop(padding_mode="wrap")


def test_flip_tta_in_validation():
    dm = DigitsDataModule(batch_size=64, eval_batch_size=512)
    dm.setup()
    torch.manual_seed(0)
    net = SmallCNN(num_classes=10, in_chans=1, width=4).eval()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = {}
    for tta in ("none", "flip"):
        model = ClassifierLitModule(net, CrossEntropyLoss(), partial(build_optimizer, name="sgd", lr=0.1), tta=tta)
        metrics[tta] = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    x, labels = dm.normalize(dm.splits["val"].images.float() / 255), dm.splits["val"].labels
    with torch.no_grad():
        logits = {"none": net(x), "flip": (net(x) + net(x.flip(-1))) / 2}
    for tta, z in logits.items():
        assert metrics[tta] == pytest.approx(F.cross_entropy(z, labels).item(), rel=1e-5)
    assert abs(metrics["none"] - metrics["flip"]) > 1e-4  # the mirror changed the predictions
    with pytest.raises(AutoclsError, match="model.tta"):
        ClassifierLitModule(net, CrossEntropyLoss(), partial(build_optimizer, name="sgd", lr=0.1), tta="rotate")


def test_image_folder_without_a_val_fraction_validates_on_test(tmp_path):
    """The speedrun on the JPG copy trains on all of train/ and validates on test/."""
    from PIL import Image

    from src.datamodules.folder import ImageFolderDataModule

    for split, n in (("train", 5), ("test", 2)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(tmp_path / split / name / f"{i}.png")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), val_fraction=0.0, image_size=8, num_workers=0, in_memory=True)
    dm.setup()
    assert len(dm.splits["train"]) == 10 and dm.splits["val"] is dm.splits["test"] and len(dm.splits["test"]) == 4


def test_throughput_callback_counts_the_images_after_warmup():
    from src.callbacks.throughput import Throughput

    dm = DigitsDataModule(batch_size=32)
    timer = Throughput(warmup_steps=1)
    model = ClassifierLitModule(SmallCNN(num_classes=10, in_chans=1, width=4), CrossEntropyLoss(),
                                partial(build_optimizer, name="sgd", lr=0.1))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[timer])
    trainer.fit(model, datamodule=dm)
    assert timer._images == 2 * 32  # the batches of steps 1 and 2
    assert timer.images_per_second > 0 and timer.fit_seconds > 0
    assert timer.images_per_second > 64 / timer.fit_seconds  # the measured interval is inside the fit


def test_bench_throughput_smoke_runs_every_path(cifar_jpg_dir):
    """scripts/bench_throughput.py end to end at smoke size on CPU: (a), (b) and (c) and the augmentation
    cost table (a config change once broke (b): the script must drop every checkpoint callback)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_throughput.py"), "--data-dir", str(cifar_jpg_dir), "--device", "cpu",
         "--steps", "2", "--warmup", "1", "--batch-size", "16", "--augmentations", "none", "cutout"],
        check=False, cwd=root, capture_output=True, text=True, timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("(a) raw loop:", "(b) ours, augmentation=none:", "(b) ours, augmentation=standard:", "(c) peer:"):
        assert line in result.stdout
    assert "| cutout |" in result.stdout and "| none |" in result.stdout
