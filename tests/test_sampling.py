"""Class re-balancing of training epochs (`data.sampler`), in memory and streamed, and end to end."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from src.datamodules.device_loader import DeviceBatches
from src.datamodules.digits import DigitsDataModule
from src.datamodules.folder import ImageFolderDataModule
from src.datamodules.sampling import (
    ClassBalancedSampler,
    epoch_indices,
    epoch_size,
    label_counts,
)
from src.train import train
from src.utils.errors import AutoclsError

COUNTS = torch.tensor([500, 200, 60, 40])  # an imbalanced 4-class label set, 800 samples


@pytest.fixture
def labels():
    # interleaved rather than sorted, so index order says nothing about the class
    return torch.repeat_interleave(torch.arange(4), COUNTS)[torch.randperm(800, generator=torch.Generator().manual_seed(5))]


def test_oversampled_epoch_has_balanced_classes_within_binomial_bounds(labels):
    """len(train) draws with replacement, each class with probability 1/4: every count lies within
    4 binomial standard deviations of 200 (the imbalanced split itself does not)."""
    n, p = len(labels), 1 / 4
    sd = (n * p * (1 - p)) ** 0.5
    for epoch in range(3):
        idx = epoch_indices(labels, "oversample", seed=0, epoch=epoch)
        assert len(idx) == epoch_size(labels, "oversample") == n
        counts = torch.bincount(labels[idx], minlength=4)
        assert ((counts - n * p).abs() < 4 * sd).all(), counts
    assert ((COUNTS - n * p).abs() > 4 * sd).any()  # the check above can fail
    # with replacement: the rarest class (40 images drawn ~200 times) repeats images
    assert len(torch.unique(idx[labels[idx] == 3])) < (labels[idx] == 3).sum()


def test_undersampled_epoch_takes_min_count_of_every_class_without_duplicates(labels):
    for epoch in range(3):
        idx = epoch_indices(labels, "undersample", seed=1, epoch=epoch)
        assert len(idx) == epoch_size(labels, "undersample") == 4 * 40
        assert len(torch.unique(idx)) == len(idx)
        assert torch.equal(torch.bincount(labels[idx], minlength=4), torch.full((4,), 40))
    # a fresh subset of the majority classes every epoch, and the classes are shuffled together
    a, b = (epoch_indices(labels, "undersample", seed=1, epoch=e) for e in (0, 1))
    assert set(a.tolist()) != set(b.tolist())
    assert len(torch.unique(labels[a[:20]])) > 1


@pytest.mark.parametrize("sampler", [None, "oversample", "undersample"])
def test_same_seed_and_epoch_give_the_same_indices(labels, sampler):
    draw = lambda seed, epoch: epoch_indices(labels, sampler, seed, epoch)
    assert torch.equal(draw(3, 2), draw(3, 2))
    assert not torch.equal(draw(3, 2), draw(3, 3))
    assert not torch.equal(draw(3, 2), draw(4, 2))


def test_no_sampler_keeps_the_permutation_that_device_batches_always_used(labels):
    """sampler=null draws the same permutation as before samplers existed (old runs resume exactly)."""
    old = torch.randperm(len(labels), generator=torch.Generator().manual_seed(7 * 100_003 + 2))
    assert torch.equal(epoch_indices(labels, None, seed=7, epoch=2), old)


def test_device_batches_draw_through_the_sampler_and_resume_mid_epoch(labels):
    images = torch.arange(800).view(800, 1, 1, 1)  # the image encodes its index

    def epoch(progress):
        batches = DeviceBatches(images, labels, batch_size=32, shuffle=True, drop_last=True, seed=2,
                                progress_fn=lambda: progress, sampling="undersample")
        assert len(batches) == 160 // 32
        return [(x.flatten(), y) for x, y in batches]

    full = epoch((4, 0))
    order = epoch_indices(labels, "undersample", seed=2, epoch=4)
    assert torch.equal(torch.cat([x for x, _ in full]), order)
    assert torch.equal(torch.cat([y for _, y in full]), labels[order])
    resumed = epoch((4, 3))  # resume after 3 batches: exactly the rest of the epoch
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, full[3:])) and len(resumed) == 2


def test_torch_sampler_follows_set_epoch(labels):
    sampler = ClassBalancedSampler(labels, "oversample", seed=3)
    sampler.set_epoch(5)
    assert len(sampler) == 800
    assert list(sampler) == epoch_indices(labels, "oversample", seed=3, epoch=5).tolist()


def test_streamed_loader_uses_the_sampler(tmp_path):
    """A streamed (file) train split: the DataLoader draws through ClassBalancedSampler, not shuffle."""
    for split, per_class in (("train", {"a": 9, "b": 3}), ("val", {"a": 1, "b": 1})):
        for name, n in per_class.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / split / name / f"{i}.png")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), in_memory=False, num_workers=0, batch_size=4,
                               image_size=8, sampler="undersample", seed=1)
    dm.setup()
    assert torch.equal(label_counts(dm.splits["train"], 2), torch.tensor([9, 3]))
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ClassBalancedSampler) and len(loader.sampler) == 6
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == 4 and len(loader) == 1  # drop_last on the 6-sample epoch
    assert not isinstance(dm.val_dataloader().sampler, ClassBalancedSampler)


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(AutoclsError, match="use null, oversample or undersample"):
        DigitsDataModule(sampler="smote")


def test_focal_balanced_oversampled_digits_run(compose_train):
    """loss=focal with balanced class weights and an oversampled train split trains the default run."""
    cfg = compose_train(["loss=focal", "loss.class_weights=balanced", "data.sampler=oversample",
                         "trainer.max_epochs=2"])
    metrics = train(cfg)
    assert metrics["val/acc"] > 0.9
