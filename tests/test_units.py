"""Unit tests for the small building blocks: device-resident batching, stratified splits, the
warmup-cosine schedule, cross-entropy, the augmentation ops and pipeline, and the digits data module.

Each test checks behaviour against an independent reference (a closed form, hand-computed counts or a
torch reference function) rather than re-running the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lr_steps import run_steps
from PIL import Image
from torch import nn
from torch.nn import functional as F

from src.augment.ops import HorizontalFlip, PadCrop, RandomResizedCrop
from src.augment.pipeline import Augmentation
from src.datamodules.base import resolve_dir, stratified_split
from src.datamodules.device_loader import DeviceBatches
from src.datamodules.digits import DigitsDataModule
from src.losses.cross_entropy import CrossEntropyLoss
from src.optim.schedulers import WarmupCosineLR
from src.utils.errors import AutoclsError

# --- DeviceBatches -----------------------------------------------------------------------------


def make_batches(n=103, batch_size=10, shuffle=True, drop_last=False, seed=3, progress=(0, 0), **kw):
    """A DeviceBatches whose labels are the sample indices and whose images encode them too."""
    labels = torch.arange(n)
    images = (labels.view(n, 1, 1, 1) * torch.ones(1, 2, 2, 2, dtype=torch.long)).clone()
    return DeviceBatches(images, labels, batch_size, shuffle, drop_last, seed=seed,
                         progress_fn=lambda: progress, **kw)


def epoch_labels(batches) -> list[torch.Tensor]:
    out = []
    for images, labels in batches:
        assert torch.equal(images[:, 0, 0, 0], labels), "images and labels were sliced apart"
        out.append(labels)
    return out


def test_device_batches_order_depends_only_on_seed_and_epoch():
    """Two instances with the same (seed, epoch) yield the same order; another epoch or seed does not."""
    a = torch.cat(epoch_labels(make_batches(seed=3, progress=(2, 0))))
    b = torch.cat(epoch_labels(make_batches(seed=3, progress=(2, 0))))
    other_epoch = torch.cat(epoch_labels(make_batches(seed=3, progress=(3, 0))))
    other_seed = torch.cat(epoch_labels(make_batches(seed=4, progress=(2, 0))))
    assert torch.equal(a, b)
    assert not torch.equal(a, other_epoch)
    assert not torch.equal(a, other_seed)
    assert not torch.equal(a, torch.arange(103))  # it is actually shuffled


def test_device_batches_cover_every_sample_once_without_drop_last():
    """drop_last=False: 103 samples in batches of 10 -> 11 batches (last one of 3), each sample once."""
    batches = make_batches(n=103, batch_size=10, drop_last=False)
    got = epoch_labels(batches)
    assert len(batches) == 11 == len(got)
    assert [len(b) for b in got] == [10] * 10 + [3]
    assert torch.equal(torch.cat(got).sort().values, torch.arange(103))


def test_device_batches_drop_last_yields_only_full_batches():
    """drop_last=True: 103 // 10 = 10 full batches of 100 distinct samples."""
    batches = make_batches(n=103, batch_size=10, drop_last=True)
    got = epoch_labels(batches)
    assert len(batches) == 10 == len(got)
    assert all(len(b) == 10 for b in got)
    assert len(torch.cat(got).unique()) == 100


@pytest.mark.parametrize("skip", [0, 1, 4, 10])
def test_device_batches_progress_skips_first_k_batches(skip):
    """progress_fn() == (epoch, k) resumes the epoch: exactly the tail of the full epoch's batches."""
    full = epoch_labels(make_batches(progress=(5, 0)))
    resumed = epoch_labels(make_batches(progress=(5, skip)))
    assert len(resumed) == len(full) - skip
    for r, f in zip(resumed, full[skip:]):
        assert torch.equal(r, f)


def test_device_batches_ranks_are_disjoint_equal_and_cover_floor_half():
    """world_size=2: the ranks share a permutation, get disjoint equal halves of floor(n/2)*2 samples."""
    n = 103
    per_rank = [torch.cat(epoch_labels(make_batches(n=n, batch_size=8, progress=(1, 0), rank=r, world_size=2)))
                for r in (0, 1)]
    lens = [len(make_batches(n=n, batch_size=8, rank=r, world_size=2)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == n // 2
    assert lens == [math.ceil((n // 2) / 8)] * 2
    both = torch.cat(per_rank)
    assert len(both.unique()) == (n // 2) * 2  # disjoint and together 102 samples


def test_device_batches_without_shuffle_keep_input_order():
    """shuffle=False yields the samples in input order, whatever the seed or epoch."""
    got = torch.cat(epoch_labels(make_batches(n=37, batch_size=5, shuffle=False, seed=9, progress=(7, 0))))
    assert torch.equal(got, torch.arange(37))
    rank1 = torch.cat(epoch_labels(make_batches(n=37, batch_size=5, shuffle=False, rank=1, world_size=2)))
    assert torch.equal(rank1, torch.arange(1, 37, 2))


def test_device_batches_reject_mismatched_lengths():
    """Images and labels of different lengths are a ValueError."""
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        DeviceBatches(torch.zeros(5, 1, 2, 2), torch.zeros(4), 2, True, False)


# --- stratified_split / resolve_dir ------------------------------------------------------------


def shuffled_labels(counts: list[int], seed: int = 0) -> torch.Tensor:
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def assert_partition(keep: torch.Tensor, held: torch.Tensor, n: int) -> None:
    assert torch.equal(torch.cat([keep, held]).sort().values, torch.arange(n))  # disjoint and covering


def test_stratified_split_fraction_holds_out_each_class_proportionally():
    """10 classes x 100, fraction 0.2 -> exactly 20 of every class held out, 80 kept."""
    labels = shuffled_labels([100] * 10)
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert_partition(keep, held, 1000)
    assert torch.bincount(labels[held], minlength=10).tolist() == [20] * 10
    assert torch.bincount(labels[keep], minlength=10).tolist() == [80] * 10


def test_stratified_split_unbalanced_classes():
    """Unequal classes (50, 30, 20), fraction 0.1 -> 5, 3 and 2 held out."""
    labels = shuffled_labels([50, 30, 20], seed=1)
    keep, held = stratified_split(labels, 0.1, seed=0)
    assert_partition(keep, held, 100)
    assert torch.bincount(labels[held], minlength=3).tolist() == [5, 3, 2]


def test_stratified_split_integer_count():
    """fraction >= 1 is a count: 5000 of CIFAR-like 10 x 5000 labels -> 500 per class."""
    labels = shuffled_labels([5000] * 10)
    keep, held = stratified_split(labels, 5000, seed=0)
    assert_partition(keep, held, 50_000)
    assert len(held) == 5000
    assert torch.bincount(labels[held], minlength=10).tolist() == [500] * 10


def test_stratified_split_is_deterministic_per_seed():
    """The same seed gives the same split; another seed another one."""
    labels = shuffled_labels([100] * 10)
    a, b, c = (stratified_split(labels, 0.2, seed=s)[1] for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_resolve_dir(tmp_path):
    """An existing directory comes back as a Path; a missing one or a file is an AutoclsError naming it."""
    assert resolve_dir(str(tmp_path), fix="fix it") == tmp_path
    missing = tmp_path / "no_such_dir"
    with pytest.raises(AutoclsError, match="does not exist") as err:
        resolve_dir(missing, fix="set data.data_dir.")
    assert str(missing) in str(err.value) and "set data.data_dir." in str(err.value)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(AutoclsError) as err:
        resolve_dir(a_file, fix="fix it")
    assert str(a_file) in str(err.value)


# --- WarmupCosineLR ----------------------------------------------------------------------------

BASE_LR = 0.1


def expected_factor(s: int, w: int, total: int, min_ratio: float) -> float:
    """Closed form: (s+1)/(w+1) while warming up, then cosine from 1 at s=w to min_ratio at s=total."""
    if s < w:
        return (s + 1) / (w + 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w)))


def make_sgd(lr: float = BASE_LR, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def test_warmup_cosine_matches_closed_form():
    """T=50, 10 steps/epoch, 1.5 warmup epochs (w=15), min ratio 0.1: every step's lr is the closed form;
    warmup is linear, the base lr is reached at step w, then lr never rises and ends at 0.1 x base."""
    total, w, min_ratio = 50, 15, 0.1
    model, opt = make_sgd()
    sched = WarmupCosineLR(opt, total_steps=total, steps_per_epoch=10, warmup_epochs=1.5, min_lr_ratio=min_ratio)
    assert sched.warmup_steps == w
    used = run_steps(model, opt, sched, total)
    final = opt.param_groups[0]["lr"]
    for s, lr in enumerate(used):
        assert lr == pytest.approx(BASE_LR * expected_factor(s, w, total, min_ratio), abs=1e-12), s
    steps = np.diff(used[:w + 1])
    assert np.allclose(steps, BASE_LR / (w + 1), atol=1e-12)  # linear rise, up to the base lr
    assert used[w] == pytest.approx(BASE_LR, abs=1e-6)
    assert all(b <= a + 1e-15 for a, b in zip(used[w:], used[w + 1:]))
    assert final == pytest.approx(min_ratio * BASE_LR, abs=1e-12)  # after the last of T steps


def test_warmup_cosine_without_warmup_and_with_too_long_warmup():
    """No warmup starts at the base lr; a warmup longer than the run is capped at total_steps - 1."""
    _, opt = make_sgd()
    WarmupCosineLR(opt, total_steps=10, steps_per_epoch=5, warmup_epochs=0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(BASE_LR, abs=1e-12)
    _, opt = make_sgd()
    sched = WarmupCosineLR(opt, total_steps=10, steps_per_epoch=5, warmup_epochs=100)
    assert sched.warmup_steps == 9
    assert opt.param_groups[0]["lr"] == pytest.approx(BASE_LR / 10, abs=1e-12)


def test_warmup_cosine_state_dict_resume_continues_identically():
    """Saving optimizer+scheduler state after 17 of 40 steps and loading it into fresh objects continues
    with exactly the lrs (and weights) of the uninterrupted run."""
    kw = dict(total_steps=40, steps_per_epoch=8, warmup_epochs=1.0, min_lr_ratio=0.05)
    model_full, opt = make_sgd()
    full = run_steps(model_full, opt, WarmupCosineLR(opt, **kw), 40)

    model, opt = make_sgd()
    sched = WarmupCosineLR(opt, **kw)
    first = run_steps(model, opt, sched, 17)
    state = (model.state_dict(), opt.state_dict(), sched.state_dict())

    model2, opt2 = make_sgd(lr=0.5, seed=1)  # different starting point, all of it overwritten by the state
    sched2 = WarmupCosineLR(opt2, **kw)
    model2.load_state_dict(state[0])
    opt2.load_state_dict(state[1])
    sched2.load_state_dict(state[2])
    rest = run_steps(model2, opt2, sched2, 23)
    assert first + rest == pytest.approx(full, abs=1e-15)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05 * BASE_LR, abs=1e-12)
    for p2, p_full in zip(model2.parameters(), model_full.parameters()):
        torch.testing.assert_close(p2, p_full, rtol=0, atol=0)


# --- CrossEntropyLoss --------------------------------------------------------------------------


def reference_ce(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """-sum(q * log_softmax(logits)) averaged over the batch, in float64."""
    return -(q.double() * torch.log_softmax(logits.double(), dim=1)).sum(1).mean()


@pytest.fixture
def logits():
    return torch.randn(8, 5, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_ce_integer_targets_with_smoothing(logits, eps):
    """Class-index targets: q = (1-eps)*onehot + eps/C."""
    target = torch.tensor([0, 1, 2, 3, 4, 4, 1, 0])
    q = (1 - eps) * F.one_hot(target, 5).double() + eps / 5
    loss = CrossEntropyLoss(eps)(logits, target)
    assert loss.item() == pytest.approx(reference_ce(logits, q).item(), abs=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_ce_soft_targets(logits, eps):
    """Probability targets: q = (1-eps)*p + eps/C."""
    p = torch.softmax(torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    loss = CrossEntropyLoss(eps)(logits, p)
    assert loss.item() == pytest.approx(reference_ce(logits, (1 - eps) * p + eps / 5).item(), abs=1e-5)


def test_ce_one_hot_soft_targets_equal_integer_targets(logits):
    """One-hot probability targets give the same loss as the class indices."""
    target = torch.tensor([4, 3, 2, 1, 0, 0, 2, 2])
    ce = CrossEntropyLoss(0.1)
    assert ce(logits, F.one_hot(target, 5).float()).item() == pytest.approx(ce(logits, target).item(), abs=1e-6)


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5])
def test_ce_rejects_invalid_smoothing(eps):
    """label_smoothing outside [0, 1) is one sentence naming the key."""
    with pytest.raises(AutoclsError, match=r"loss.label_smoothing=.* must be in \[0, 1\)"):
        CrossEntropyLoss(eps)


def test_ce_bf16_logits_give_float32_loss(logits):
    """bf16 logits are upcast: the loss is float32 and equals the loss of the upcast logits."""
    target = torch.tensor([0, 1, 2, 3, 4, 4, 1, 0])
    half = logits.bfloat16()
    loss = CrossEntropyLoss(0.1)(half, target)
    assert loss.dtype == torch.float32
    q = 0.9 * F.one_hot(target, 5).double() + 0.1 / 5
    assert loss.item() == pytest.approx(reference_ce(half.float(), q).item(), abs=1e-5)


# --- augmentation ops --------------------------------------------------------------------------


def test_padcrop_outputs_are_windows_of_the_padded_input():
    """Each output is the (2p+1)^2-offset window of the zero-padded input for one offset (same for all
    channels); shape is kept and the offsets vary across a batch of 64."""
    torch.manual_seed(0)
    b, c, h, w, p = 64, 3, 8, 10, 3
    x = torch.arange(1, b * c * h * w + 1, dtype=torch.float32).view(b, c, h, w)  # distinct, non-zero
    out = PadCrop(padding=p)(x)
    assert out.shape == x.shape
    padded = F.pad(x, (p, p, p, p))
    offsets = []
    for i in range(b):
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + h, dx:dx + w])]
        assert len(matches) == 1, f"sample {i} is not a window of its padded input"
        offsets.append(matches[0])
    assert len(set(offsets)) > 1
    assert len({dy for dy, _ in offsets}) > 1 and len({dx for _, dx in offsets}) > 1


def test_horizontal_flip_p1_p0():
    """p=1 mirrors every image (x.flip(-1)); p=0 returns the input unchanged."""
    x = torch.randn(16, 3, 5, 7)
    assert torch.equal(HorizontalFlip(p=1.0)(x), x.flip(-1))
    assert torch.equal(HorizontalFlip(p=0.0)(x), x)


def test_horizontal_flip_half():
    """p=0.5 flips each of 2000 images independently: every output is the image or its mirror, and the
    flipped count lies within 5 sd of Binomial(2000, 0.5) (1000 +- 112)."""
    torch.manual_seed(0)
    x = torch.arange(3.0).expand(2000, 1, 2, 3).clone()
    out = HorizontalFlip(p=0.5)(x)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all())
    assert 888 <= int(flipped.sum()) <= 1112


def test_random_resized_crop_shape_and_range():
    """Output is (B, C, size, size) and, being bilinear, stays within the input's value range."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 20, 24)
    out = RandomResizedCrop(size=12)(x)
    assert out.shape == (6, 3, 12, 12)
    assert out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6


@pytest.mark.parametrize("size", [9, 16, 24])
def test_random_resized_crop_full_box_is_a_bilinear_resize(size):
    """scale=(1,1), ratio=(1,1) on a square image crops the whole image: the output equals
    F.interpolate(bilinear, align_corners=True) of the input."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    out = RandomResizedCrop(size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0))(x)
    ref = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_random_resized_crop_keeps_constant_images_constant():
    """Any crop of a constant image is the same constant."""
    torch.manual_seed(0)
    x = torch.full((8, 3, 17, 23), 0.37)
    out = RandomResizedCrop(size=11)(x)
    torch.testing.assert_close(out, torch.full((8, 3, 11, 11), 0.37), rtol=0, atol=1e-6)


# --- Augmentation pipeline ---------------------------------------------------------------------


class Add(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x):
        return x + self.v


class Mul(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x):
        return x * self.v


def test_augmentation_applies_ops_in_mapping_order():
    """{add 1, mul 2} computes (x+1)*2; the reverse mapping computes 2x+1; no ops is the identity."""
    x = torch.full((1, 1, 2, 2), 3.0)
    assert torch.equal(Augmentation({"add": Add(1), "mul": Mul(2)})(x), torch.full_like(x, 8.0))
    assert torch.equal(Augmentation({"mul": Mul(2), "add": Add(1)})(x), torch.full_like(x, 7.0))
    assert torch.equal(Augmentation()(x), x)
    assert torch.equal(Augmentation({})(x), x)


def test_augmentation_drops_none_ops():
    """None entries (ops removed with `=null`) are dropped, also before a crop, which then counts as first."""
    aug = Augmentation({"crop": None, "flip": HorizontalFlip(p=1.0)})
    assert list(aug.ops) == ["flip"]
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(aug(x), x.flip(-1))
    aug = Augmentation({"gone": None, "crop": PadCrop(2), "flip": HorizontalFlip()})
    assert list(aug.ops) == ["crop", "flip"]


@pytest.mark.parametrize(
    "ops",
    [
        {"flip": HorizontalFlip(), "crop": PadCrop(4)},
        {"crop": PadCrop(4), "rrc": RandomResizedCrop(8)},
        {"rrc": RandomResizedCrop(8), "flip": HorizontalFlip(), "crop": PadCrop(4)},
    ],
    ids=["crop-not-first", "two-crops", "two-crops-second-late"],
)
def test_augmentation_rejects_misplaced_or_extra_crop(ops):
    """A crop that is not first, or a second crop, is an AutoclsError."""
    with pytest.raises(AutoclsError, match="at most one crop"):
        Augmentation(ops)


@pytest.mark.parametrize(
    "ops",
    [
        None,
        {"flip": HorizontalFlip()},
        {"crop": PadCrop(4), "flip": HorizontalFlip()},
        {"crop": RandomResizedCrop(16), "flip": HorizontalFlip()},
    ],
    ids=["none", "flip-only", "padcrop", "rrc"],
)
def test_augmentation_sample_transform_gives_fixed_size_uint8(ops):
    """On an odd-sized (37x23) RGB PIL image the per-sample transform yields a uint8 (3, 16, 16) tensor."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8))
    torch.manual_seed(0)
    out = Augmentation(ops).sample_transform(16)(img)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)


def test_augmentation_sample_transform_flip_mirrors_the_resized_image():
    """Without a crop, p=1 flip gives exactly the mirror of the p=0 (resize + centre crop only) output."""
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (23, 37, 3), dtype=np.uint8))
    plain = Augmentation({"flip": HorizontalFlip(p=0.0)}).sample_transform(16)(img)
    flipped = Augmentation({"flip": HorizontalFlip(p=1.0)}).sample_transform(16)(img)
    assert torch.equal(flipped, plain.flip(-1))


# --- DigitsDataModule --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


def sample_keys(split) -> list[tuple[bytes, int]]:
    return [(img.numpy().tobytes(), int(lab)) for img, lab in zip(split.images, split.labels)]


def test_digits_splits_partition_the_dataset(digits):
    """train/val/test sizes sum to 1797, and together they are exactly the dataset's (image, label)
    multiset, so no sample is in two splits or missing."""
    from sklearn.datasets import load_digits

    sizes = {k: len(v) for k, v in digits.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["val"] == pytest.approx(0.15 * 1797, abs=2)
    assert sizes["test"] == pytest.approx(0.15 * 1797, abs=2)
    full = load_digits()
    ref_images = torch.from_numpy(full.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
    ref = sorted((img.numpy().tobytes(), int(lab)) for img, lab in zip(ref_images, full.target))
    got = sorted(sum((sample_keys(digits.splits[k]) for k in ("train", "val", "test")), []))
    assert got == ref


def test_digits_split_is_the_same_on_two_instances(digits):
    """A second data module gets bit-identical splits."""
    other = DigitsDataModule()
    other.setup()
    for name in ("train", "val", "test"):
        assert torch.equal(other.splits[name].images, digits.splits[name].images)
        assert torch.equal(other.splits[name].labels, digits.splits[name].labels)


def test_digits_split_is_stratified(digits):
    """Each class's val and test counts are within 1 of 15% of that class's size."""
    totals = torch.bincount(torch.cat([s.labels for s in digits.splits.values()]), minlength=10)
    for name in ("val", "test"):
        counts = torch.bincount(digits.splits[name].labels, minlength=10)
        assert (counts.double() - 0.15 * totals.double()).abs().max() <= 1, name


def test_digits_tensors_and_description(digits):
    """uint8 (N, 1, 8, 8) images spanning 0..255, int64 labels 0..9, and the describe() record."""
    for split in digits.splits.values():
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 8, 8)
        assert split.labels.dtype == torch.int64
    train = digits.splits["train"]
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    d = digits.describe()
    assert d["num_classes"] == 10
    assert d["class_names"] == [str(i) for i in range(10)]
    assert d["in_chans"] == 1 and d["image_size"] == 8
    assert len(d["mean"]) == len(d["std"]) == 1


def test_digits_on_after_batch_transfer_without_trainer_normalises(digits):
    """Outside a Trainer (dm.trainer is None) a uint8 batch becomes ((x/255)-mean)/std, unaugmented."""
    assert digits.trainer is None
    split = digits.splits["train"]
    x, y = split.images[:32], split.labels[:32]
    before = x.clone()
    images, labels = digits.on_after_batch_transfer((x, y), 0)
    assert images.dtype == torch.float32 and images.shape == (32, 1, 8, 8)
    ref = ((x.double() / 255) - 0.3059) / 0.3761
    torch.testing.assert_close(images.double(), ref, rtol=0, atol=1e-6)
    assert torch.equal(labels, y) and torch.equal(x, before)


def test_digits_loaders_without_trainer(digits):
    """Without a trainer the val loader yields the val split once, in order; the train loader drops the
    last partial batch (len = n_train // batch_size) and yields uint8 CPU batches."""
    val = digits.val_dataloader()
    got = list(val)
    assert torch.equal(torch.cat([y for _, y in got]), digits.splits["val"].labels)
    train = digits.train_dataloader()
    n_train = len(digits.splits["train"])
    assert len(train) == n_train // 64
    batches = list(train)
    assert len(batches) == n_train // 64
    assert all(x.dtype == torch.uint8 and x.shape == (64, 1, 8, 8) for x, _ in batches)


# --- regressions of fixed bugs ---------------------------------------------------------------


def test_stratified_split_integer_count_is_honoured_in_total():
    """fraction >= 1 holds out "that many images in all" (docstring), also when the count is not a
    multiple of the class count: 25 of 10 classes x 100 -> 25 held out (per-class rounding gives 20)."""
    labels = shuffled_labels([100] * 10)
    keep, held = stratified_split(labels, 25, seed=0)
    assert_partition(keep, held, 1000)
    assert len(held) == 25
    assert set(torch.bincount(labels[held], minlength=10).tolist()) == {2, 3}  # still stratified


def test_padcrop_sample_transform_uses_fill():
    """The per-sample CPU transform is meant to be the equivalent of the device op, so PadCrop(fill=1.0)
    pads a black image with white (255): over 20 draws some output pixels must be 255."""
    img = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    t = PadCrop(padding=4, fill=1.0).sample_transform(8)
    torch.manual_seed(0)
    device_out = PadCrop(padding=4, fill=1.0)(torch.zeros(20, 3, 8, 8))
    assert bool((device_out == 1.0).any())  # the device op does pad with `fill`
    assert any(bool((np.asarray(t(img)) == 255).any()) for _ in range(20))
