"""AugMix's Jensen-Shannon consistency loss: the divergence against closed forms, the 3-view batches on
both data paths (in memory, streamed), the loss and metrics of `ClassifierLitModule` on them, and
determinism under a seed."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.nn import functional as F

from src.augment.ops import PadCrop
from src.augment.pipeline import Augmentation
from src.augment.policies import AugMix
from src.datamodules.folder import ImageFolderDataModule
from src.lit_models.classifier import ClassifierLitModule
from src.losses.cross_entropy import CrossEntropyLoss
from src.losses.jsd import JensenShannonConsistency, jensen_shannon
from src.models.small_cnn import SmallCNN
from src.optim.optimizers import build_optimizer
from src.train import train
from src.utils.errors import AutoclsError


def _entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(p)).sum())


# --- the divergence ----------------------------------------------------------------------------


def test_jensen_shannon_equals_entropy_of_mixture_minus_mean_entropy():
    """JS(p_1..p_k) = H(M) - mean H(p_i), M the mean distribution (the identity behind the KL form)."""
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    expected = _entropy(p.mean(0)) - np.mean([_entropy(q) for q in p])
    logits = [torch.tensor(np.log(q)).unsqueeze(0) for q in p]
    assert jensen_shannon(*logits).item() == pytest.approx(expected, rel=1e-5)


def test_jensen_shannon_limits():
    """0 for identical predictions; ln 2 for two disjoint ones; the batch is averaged."""
    z = torch.randn(5, 7)
    assert jensen_shannon(z, z, z).item() == pytest.approx(0.0, abs=1e-6)
    sure_a, sure_b = torch.tensor([[60.0, 0.0]]), torch.tensor([[0.0, 60.0]])
    assert jensen_shannon(sure_a, sure_b).item() == pytest.approx(math.log(2), rel=1e-5)
    batch = jensen_shannon(torch.cat([sure_a, sure_a]), torch.cat([sure_b, sure_a]))
    assert batch.item() == pytest.approx(math.log(2) / 2, rel=1e-5)


def test_consistency_weight_is_lambda():
    a, b, c = torch.randn(3, 4, 10).unbind(0)
    assert JensenShannonConsistency()(a, b, c).item() == pytest.approx(12 * jensen_shannon(a, b, c).item(), rel=1e-6)
    assert JensenShannonConsistency(weight=1.5)(a, b, c).item() == pytest.approx(1.5 * jensen_shannon(a, b, c).item(), rel=1e-6)
    with pytest.raises(AutoclsError, match="weight"):
        JensenShannonConsistency(weight=-1)


# --- the views, on both paths ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """2 classes x 8 random 16x16 PNGs in train/, 2 x 2 in test/."""
    root = tmp_path_factory.mktemp("tiny_folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _augmix_jsd() -> Augmentation:
    return Augmentation({"crop": PadCrop(padding=2), "augmix": AugMix(jsd=True)})


def _folder(root, in_memory: bool) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        data_dir=str(root), val_fraction=0.25, batch_size=4, num_workers=0, image_size=16, crop_pct=1.0,
        in_memory=in_memory, augmentation=_augmix_jsd(),
    )
    dm.setup()
    return dm


def test_streamed_sample_transform_gives_the_clean_image_and_two_views(tiny_folder):
    """Per sample: (3, C, H, W), the first view the (cropped) image untouched, the others AugMix'd; the
    same seed gives the same views."""
    image = Image.open(next((tiny_folder / "train" / "a").iterdir())).convert("RGB")
    transform = Augmentation({"augmix": AugMix(jsd=True)}).sample_transform(16)
    torch.manual_seed(3)
    views = transform(image)
    assert views.shape == (3, 3, 16, 16) and views.dtype == torch.uint8
    assert torch.equal(views[0], torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert not torch.equal(views[1], views[0]) and not torch.equal(views[1], views[2])
    torch.manual_seed(3)
    assert torch.equal(transform(image), views)


def test_device_views_are_deterministic_under_a_seed():
    x = torch.rand(6, 3, 16, 16)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(_augmix_jsd()(x))
    assert outs[0].shape == (18, 3, 16, 16)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


class _CheckJSDStep(pl.Callback):
    """Checks the first training step: 3B images for B labels after the data module's transfer hook,
    the loss is CE(clean) + 12 JS(clean, aug1, aug2), accuracy counted on the clean third only."""

    def __init__(self) -> None:
        self.checked = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images, labels = batch
        assert images.shape[0] == 3 * labels.shape[0] and images.dtype == torch.float32
        with torch.no_grad():  # lr 0 leaves the weights as they are; BN uses this same batch's statistics
            clean, aug1, aug2 = pl_module(images).chunk(3)
        self.expected = F.cross_entropy(clean, labels) + 12 * jensen_shannon(clean, aug1, aug2)
        self.batch = labels.shape[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        assert loss.item() == pytest.approx(self.expected.item(), rel=1e-4)
        acc = pl_module.train_metrics["acc"]
        assert int((acc.tp + acc.fn).sum()) == self.batch  # one prediction per label
        self.checked = True


@pytest.mark.parametrize("in_memory", [True, False])
def test_lit_module_trains_on_three_views(tiny_folder, in_memory):
    dm = _folder(tiny_folder, in_memory)
    net = SmallCNN(num_classes=2, in_chans=3, width=4, dropout=0.0)
    model = ClassifierLitModule(
        net, CrossEntropyLoss(), partial(build_optimizer, name="sgd", lr=0.0), consistency=JensenShannonConsistency()
    )
    check = _CheckJSDStep()
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=1, callbacks=[check], logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert check.checked


def test_three_views_without_a_consistency_loss_is_one_sentence(tiny_folder):
    net = SmallCNN(num_classes=2, in_chans=3, width=4)
    model = ClassifierLitModule(net, CrossEntropyLoss(), partial(build_optimizer, name="sgd", lr=0.0))
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.raises(AutoclsError, match="model.consistency"):
        trainer.fit(model, datamodule=_folder(tiny_folder, in_memory=True))


def test_augmix_jsd_from_the_command_line(compose_train):
    """`augmentation=augmix augmentation.ops.augmix.jsd=true` trains with the configured consistency
    loss (digits, in memory)."""
    cfg = compose_train(["augmentation=augmix", "augmentation.ops.augmix.jsd=true", "trainer.fast_dev_run=true",
                         "logger=none"])
    assert cfg.model.consistency.weight == 12.0
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and 0 <= metrics["test/acc"] <= 1
