"""The augmentation library against its definitions: masked fractions and box geometry of the erasing
ops, label weights of the batch mixers, the policy ops against torchvision, device vs streamed path,
the GridMask ramp, seeding, every augmentation config, and one training run with a combination."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from src.augment.erasing import Cutout, GridMask, HideAndSeek, RandomErasing
from src.augment.mixing import BatchMixing, CutMix, Mixup
from src.augment.ops import HorizontalFlip, PadCrop
from src.augment.pipeline import Augmentation
from src.augment.policies import AugMix, AutoAugment, RandAugment, TrivialAugment
from src.callbacks.gridmask_ramp import GridMaskRamp
from src.datamodules.base import FileSplit
from src.datamodules.digits import DigitsDataModule
from src.train import train
from src.utils.errors import AutoclsError, find_user_error

AUGMENTATIONS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "augmentation").glob("*.yaml"))


def _uniform_batch(b: int, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images with values in [0.2, 0.8], so an erasing fill of 0 is unambiguous."""
    return 0.2 + 0.6 * torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def _clipped_length_mean(side: int, length: int) -> float:
    """Mean clipped extent of a `length` box centred on a uniform pixel of `side` (enumerated)."""
    half = length // 2
    return float(np.mean([min(c + half, side) - max(c - half, 0) for c in range(side)]))


# --- erasing ops: the fraction they claim ------------------------------------------------------


@pytest.mark.parametrize("length", [8, 16, 0.5])
def test_cutout_masks_the_expected_fraction(length):
    """One hole of side L centred on a uniform pixel of a 32x32 image, clipped: the masked fraction over
    2000 images is E[clipped height] * E[clipped width] / 32^2 (enumerated), within 2%; float lengths
    are fractions of the side (0.5 -> 16 px)."""
    torch.manual_seed(0)
    x = _uniform_batch(2000)
    out = Cutout(n_holes=1, length=length, fill=0.0)(x)
    masked = (out == 0).all(1).float().mean()
    pixels = length if isinstance(length, int) else round(length * 32)
    expected = (_clipped_length_mean(32, pixels) / 32) ** 2
    assert float(masked) == pytest.approx(expected, rel=0.02)
    untouched = out != 0
    assert torch.equal(out[untouched], x[untouched])


def test_hide_and_seek_masks_whole_cells_with_the_expected_fraction():
    """Grid sizes {0, 4, 8} and hide_prob 0.5 on 32x32: the masked fraction is 2/3 * 0.5; an image with
    grid g is constant over each g x g cell of its mask."""
    torch.manual_seed(0)
    out = HideAndSeek(grid_sizes=[0, 4, 8], hide_prob=0.5, fill=0.0)(_uniform_batch(3000))
    mask = (out == 0).all(1)
    assert float(mask.float().mean()) == pytest.approx(2 / 3 * 0.5, abs=0.01)
    for m in mask[:50]:
        if m.any():
            cells = [g for g in (4, 8) if torch.equal(m, m[::g, ::g].repeat_interleave(g, 0).repeat_interleave(g, 1))]
            assert cells, "mask is not made of whole grid cells"


@pytest.mark.parametrize(("mode", "prob"), [(0, 1.0), (1, 1.0), (0, 0.5)])
def test_gridmask_masks_the_expected_fraction(mode, prob):
    """Period d uniform in [d1, d2), stripe l = int(d * ratio + 0.5) at a uniform offset along each axis:
    a pixel survives mode 0 with probability (1 - l/d)^2, so the masked fraction is
    prob * mean_d(1 - (1 - l/d)^2) (mode 1: prob * mean_d((1 - l/d)^2)), within 0.01 over 2000 images."""
    torch.manual_seed(0)
    out = GridMask(d1=6, d2=20, ratio=0.4, mode=mode, prob=prob, fill=0.0)(_uniform_batch(2000))
    kept = [(1 - int(d * 0.4 + 0.5) / d) ** 2 for d in range(6, 20)]
    expected = prob * float(np.mean([1 - k for k in kept] if mode == 0 else kept))
    assert float((out == 0).all(1).float().mean()) == pytest.approx(expected, abs=0.01)


def test_gridmask_rotation_keeps_the_fraction_and_rotates():
    """rotate=90 draws angles 0..89: about the same masked fraction, but a grid that is no longer
    axis-aligned."""
    torch.manual_seed(0)
    x = _uniform_batch(1000, size=48)
    straight = (GridMask(d1=8, d2=24, rotate=1, fill=0.0)(x) == 0).all(1)
    rotated = (GridMask(d1=8, d2=24, rotate=90, fill=0.0)(x) == 0).all(1)
    assert float(rotated.float().mean()) == pytest.approx(float(straight.float().mean()), abs=0.03)
    # unrotated, a mask's rows take at most two patterns: on a horizontal stripe or between stripes
    row_patterns = lambda m: len({tuple(r.tolist()) for r in m})
    assert max(row_patterns(m) for m in straight[:20]) <= 2
    assert max(row_patterns(m) for m in rotated[:20]) > 2


def _box_sizes(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Height and width of each (N, H, W) mask's True region, asserting that it is one rectangle
    (0 x 0 where nothing is masked)."""
    rows, cols = mask.any(2), mask.any(1)
    h, w = rows.sum(1), cols.sum(1)
    first = lambda m: m.int().argmax(1)
    last = lambda m: m.shape[1] - 1 - first(m.flip(1))
    masked = h > 0
    assert torch.equal((last(rows) - first(rows) + 1)[masked], h[masked]), "masked rows are not contiguous"
    assert torch.equal((last(cols) - first(cols) + 1)[masked], w[masked]), "masked columns are not contiguous"
    assert torch.equal(mask.sum((1, 2)), h * w), "the masked pixels are not one rectangle"
    return h, w


@pytest.mark.parametrize("use_log_aspect", [False, True])
def test_random_erasing_area_aspect_and_probability(use_log_aspect):
    """Every erased region is one rectangle with area in [sl, sh] of the image and aspect h/w in
    [r1, 1/r1] (up to rounding h and w to pixels), filled with `mean`; about EPSILON of the images."""
    torch.manual_seed(0)
    x = _uniform_batch(1500, c=1, size=64)
    op = RandomErasing(EPSILON=0.6, sl=0.05, sh=0.3, r1=0.4, use_log_aspect=use_log_aspect, mean=[0.0])
    out = op(x)
    h, w = _box_sizes((out == 0).all(1))
    erased = h > 0
    assert float(erased.float().mean()) == pytest.approx(0.6, abs=0.04)
    h, w = h[erased].double(), w[erased].double()
    # rounding each side by up to 0.5 px changes the area by up to (h + w) / 2 + 1/4
    slack = (h + w) / 2 + 0.25
    assert bool(((0.05 * 64 * 64 - slack <= h * w) & (h * w <= 0.3 * 64 * 64 + slack)).all())
    assert bool(((h + 0.5) / (w - 0.5) >= 0.4).all() and ((h - 0.5) / (w + 0.5) <= 1 / 0.4).all())  # r1..1/r1
    untouched = out != 0
    assert torch.equal(out[untouched], x[untouched])


def test_random_erasing_pixel_mode_draws_normalised_noise():
    """mode=pixel fills mean + std * N(0, 1) per pixel: the erased values have that mean and spread."""
    torch.manual_seed(0)
    x = torch.full((400, 1, 32, 32), 5.0)  # a value the noise never produces
    out = RandomErasing(EPSILON=1.0, mode="pixel", mean=[0.4], std=[0.2])(x)
    values = out[out != 5.0]
    assert len(values) > 10_000
    assert float(values.mean()) == pytest.approx(0.4, abs=0.01)
    assert float(values.std()) == pytest.approx(0.2, abs=0.01)


# --- batch mixing --------------------------------------------------------------------------------


def _coded_batch(b: int, size: int = 16) -> torch.Tensor:
    """Image i is 1 at its own pixel i and 0 elsewhere, so a mix reveals partner and weight."""
    x = torch.zeros(b, 1, size * size)
    x[torch.arange(b), 0, torch.arange(b)] = 1.0
    return x.view(b, 1, size, size)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_mixup_targets_equal_the_image_weights(mode):
    """For every image, the weight of its own code pixel is lam and the partner's is 1 - lam; the target
    is lam * onehot(y) + (1 - lam) * onehot(y_partner), and in mode batch lam is one value."""
    torch.manual_seed(0)
    b, k = 64, 7
    x, y = _coded_batch(b), torch.randint(0, k, (b,))
    out, targets = BatchMixing(mixup=Mixup(alpha=0.4), num_classes=k, mode=mode)(x, y)
    flat = out.flatten(1)
    lams = []
    for i in range(b):
        own = float(flat[i, i])
        others = [j for j in flat[i].nonzero().flatten().tolist() if j != i]
        partner = others[0] if others else i
        lam = own if others else 1.0
        expected = lam * torch.nn.functional.one_hot(y[i], k) + (1 - lam) * torch.nn.functional.one_hot(y[partner], k)
        torch.testing.assert_close(targets[i], expected.float(), atol=1e-6, rtol=0)
        lams.append(lam)
    mixed = [lam for lam in lams if lam < 1.0]
    if mode == "batch":
        assert max(mixed) - min(mixed) < 1e-6
    else:
        assert len({round(lam, 6) for lam in mixed}) > b // 2


def test_cutmix_lambda_is_one_minus_the_pasted_box():
    """Each image is a constant distinct from the others: the pasted region is one rectangle, clipped to
    the image, of the partner's value, and the label weight of the image is 1 - its area fraction."""
    torch.manual_seed(0)
    b, size = 200, 20
    values = torch.randperm(b).float() + 1
    x = values.view(b, 1, 1, 1).expand(b, 1, size, size).clone()
    y = torch.arange(b)  # one class per image, so targets name the partner
    out, targets = BatchMixing(cutmix=CutMix(alpha=1.0), num_classes=b, mode="elem")(x, y)
    pasted = out[:, 0] != x[:, 0]
    h, w = _box_sizes(pasted)
    own_weight = targets[torch.arange(b), y]
    torch.testing.assert_close(own_weight, 1 - (h * w).float() / size**2, atol=1e-6, rtol=0)
    partner = targets.clone().fill_diagonal_(0).argmax(1)  # the other class with weight
    for i in torch.nonzero(h > 0).flatten().tolist():
        assert torch.all(out[i, 0][pasted[i]] == values[partner[i]])
    assert int((h > 0).sum()) > b // 2


def test_mixed_targets_sum_to_one_with_smoothing():
    """Label-smoothed mixed targets are probabilities: non-negative, rows summing to 1, smallest entry
    smoothing / C where neither label is the class."""
    torch.manual_seed(0)
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,))
    mixer = BatchMixing(mixup=Mixup(0.2), cutmix=CutMix(1.0), num_classes=10, label_smoothing=0.1, mode="elem")
    _, targets = mixer(x, y)
    assert targets.shape == (32, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(32), atol=1e-6, rtol=0)
    assert float(targets.min()) == pytest.approx(0.01, abs=1e-6)


def test_switch_prob_picks_cutmix_and_mixup_about_half_the_time():
    """switch_prob 0.5 in mode elem: of 2000 images those CutMixed (partly pasted, rest untouched) and
    those Mixuped (every pixel a blend) are each about half (5 sd of Binomial)."""
    torch.manual_seed(0)
    b = 2000
    x = (torch.randperm(b).float() + 1).view(b, 1, 1, 1).expand(b, 1, 16, 16).clone()
    out, _ = BatchMixing(Mixup(1.0), CutMix(1.0), num_classes=2, switch_prob=0.5, mode="elem")(x, torch.zeros(b, dtype=torch.long))
    own = out[:, 0] == x[:, 0]
    cutmixed = (own.flatten(1).any(1) & ~own.flatten(1).all(1)).sum()
    mixuped = (~own.flatten(1).any(1)).sum()
    # CutMix boxes of < 2 px and images paired with themselves look unmixed: a few percent
    assert int(cutmixed) + int(mixuped) > 0.9 * b
    assert abs(int(cutmixed) - int(mixuped)) < 5 * math.sqrt(b)


def test_mix_prob_zero_leaves_images_and_gives_one_hot_targets():
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 5, (16,))
    out, targets = BatchMixing(mixup=Mixup(0.2), num_classes=5, mix_prob=0.0)(x, y)
    assert torch.equal(out, x)
    assert torch.equal(targets, torch.nn.functional.one_hot(y, 5).float())


def test_mixing_num_classes_comes_from_the_config_or_the_data():
    """A null config count takes the data's; a count that contradicts the data is a user error."""
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    assert BatchMixing(mixup=Mixup())(x, y, num_classes=6)[1].shape == (4, 6)
    with pytest.raises(AutoclsError, match="the data has 6 classes"):
        BatchMixing(mixup=Mixup(), num_classes=4)(x, y, num_classes=6)
    with pytest.raises(AutoclsError, match="neither mixup nor cutmix"):
        BatchMixing()


def test_streamed_training_batches_are_mixed_after_normalisation():
    """on_after_batch_transfer mixes training batches of streamed data too (their ops ran on the CPU):
    soft targets out; validation batches keep their integer labels."""
    dm = DigitsDataModule(augmentation=Augmentation({}, BatchMixing(cutmix=CutMix(), num_classes=10)))
    dm.splits = {"train": FileSplit([("a.png", 0)])}  # streamed data: the device ops are skipped
    x, y = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), torch.arange(8)
    dm.trainer = SimpleNamespace(training=True)
    images, targets = dm.on_after_batch_transfer((x, y), 0)
    assert targets.shape == (8, 10) and targets.is_floating_point()
    assert images.shape == (8, 1, 8, 8)
    dm.trainer = SimpleNamespace(training=False)
    assert torch.equal(dm.on_after_batch_transfer((x, y), 0)[1], y)


# --- policy ops vs torchvision -------------------------------------------------------------------

OP_MAGNITUDES = {
    "ShearX": 0.3, "ShearY": -0.2, "TranslateX": 5.7, "TranslateY": -4.2, "Rotate": 20.0, "Brightness": 0.5,
    "Color": -0.5, "Contrast": 0.6, "Sharpness": 0.9, "Posterize": 3.0, "Solarize": 0.4, "AutoContrast": 0.0,
    "Equalize": 0.0, "Invert": 0.0,
}


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", sorted(OP_MAGNITUDES))
def test_policy_ops_match_torchvision(name, channels):
    """Each device op on a float batch equals torchvision's op (the streamed path) on the uint8 images:
    colour ops within 1.5/255 (rounding), geometric ops except at rounding ties (< 5% of pixels)."""
    torch.manual_seed(0)
    # smooth images whose channels differ in brightness, so per-channel and luma statistics differ
    small = torch.rand(8, channels, 6, 6) * torch.tensor([1.0, 0.6, 0.3][:channels]).view(1, -1, 1, 1)
    images = (torch.nn.functional.interpolate(small, size=(24, 24), mode="bilinear") * 255).round().to(torch.uint8)
    reference_op = v2.RandAugment(fill=128)
    m = OP_MAGNITUDES[name]
    ref = torch.stack([
        reference_op._apply_image_or_video_transform(img, name, m, interpolation=InterpolationMode.NEAREST, fill=reference_op._fill)
        for img in images
    ]).float()
    op = RandAugment(fill=128 / 255)
    ops = torch.full((8,), op.names.index(name)) if name in op.names else None
    if ops is None:  # Invert is not in RandAugment's space; AutoAugment has it
        op = AutoAugment(fill=128 / 255)
        ops = torch.full((8,), op.names.index(name))
    out = _apply_at(op, images.float() / 255, ops, m) * 255
    diff = (out - ref).abs()
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        assert float((diff > 1.5).float().mean()) < 0.05
    else:
        assert float(diff.max()) <= 1.5


def _apply_at(op, x, ops, magnitude):
    """Run `op._apply` with a fixed magnitude instead of its table (and no random sign)."""
    original = op._magnitudes
    op._magnitudes = lambda h, w: torch.full((len(op.names), op.num_bins), float(magnitude))
    op._signed = torch.zeros(len(op.names), dtype=torch.bool)
    try:
        return op._apply(x, ops, torch.zeros(len(x), dtype=torch.long))
    finally:
        op._magnitudes = original


def test_device_and_streamed_paths_agree_in_distribution():
    """Cutout masks the same expected fraction on the device batch and through sample_transform on PIL
    images; RandAugment changes pixels by the same mean amount on the device as torchvision's does on
    PIL images (within 10%)."""
    torch.manual_seed(0)
    n = 400
    x = _uniform_batch(n)
    pil = [Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()) for img in x]
    x = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pil]).float() / 255

    cutout = Cutout(length=12, fill=0.0)
    device_fraction = float((cutout(x) == 0).all(1).float().mean())
    transform = cutout.sample_transform(32)
    streamed = torch.stack([transform(p) for p in pil])
    assert streamed.dtype == torch.uint8
    streamed_fraction = float((streamed == 0).all(1).float().mean())
    expected = (_clipped_length_mean(32, 12) / 32) ** 2
    assert device_fraction == pytest.approx(expected, rel=0.05)
    assert streamed_fraction == pytest.approx(expected, rel=0.05)

    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8), size=(32, 32), mode="bilinear")
    smooth_pil = [Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()) for img in smooth]
    smooth = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in smooth_pil]).float() / 255
    rand_augment = RandAugment(num_layers=2, magnitude=5)
    device_change = float((rand_augment(smooth) - smooth).abs().mean())
    transform = rand_augment.sample_transform(32)
    streamed = torch.stack([torch.from_numpy(np.asarray(transform(p))).permute(2, 0, 1) for p in smooth_pil])
    streamed_change = float((streamed.float() / 255 - smooth).abs().mean())
    assert device_change == pytest.approx(streamed_change, rel=0.1)


def test_policies_draw_ops_per_sample():
    """One RandAugment call gives images of one batch different ops: identical inputs come out in many
    different ways (kornia's policies would apply one op path to the whole batch)."""
    torch.manual_seed(0)
    x = _uniform_batch(1, size=16).expand(64, -1, -1, -1)
    for op in (RandAugment(), AutoAugment(), TrivialAugment(), AugMix()):
        out = op(x)
        assert len({tuple(o.flatten()[:64].tolist()) for o in out}) > 10, type(op).__name__


def test_augmix_jsd_returns_clean_and_two_views():
    """jsd=true: 3B images, the first B untouched (streamed: see tests/test_jsd.py); batch mixing
    refuses it."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    out = AugMix(jsd=True)(x)
    assert out.shape == (12, 3, 16, 16) and torch.equal(out[:4], x)
    with pytest.raises(AutoclsError, match="jsd=false"):
        Augmentation({"augmix": AugMix(jsd=True)}, BatchMixing(mixup=Mixup(), num_classes=3))


# --- shared behaviour: seeding, sample transforms ----------------------------------------------

ALL_OPS = [
    AutoAugment(), AutoAugment("cifar10"), RandAugment(), TrivialAugment(), AugMix(), Cutout(),
    RandomErasing(mode="pixel"), HideAndSeek(), GridMask(rotate=30),
]


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: type(op).__name__)
def test_ops_are_deterministic_under_a_seed(op):
    """torch.manual_seed then the op twice gives identical outputs; another seed another output."""
    x = _uniform_batch(16, size=24)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(op(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: type(op).__name__)
def test_sample_transforms_give_fixed_size_uint8(op, mode):
    """Every op's streamed form, in a pipeline after a crop, turns an RGB or grayscale PIL image into a
    uint8 tensor of the pipeline's size."""
    channels = 3 if mode == "RGB" else 1
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (23, 37, channels), dtype=np.uint8).squeeze())
    torch.manual_seed(0)
    out = Augmentation({"crop": PadCrop(2), "flip": HorizontalFlip(), "op": op}).sample_transform(16)(img)
    assert out.dtype == torch.uint8 and out.shape == (channels, 16, 16)


# --- GridMask probability ramp -----------------------------------------------------------------


def _fake_trainer(op: GridMask, epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, datamodule=SimpleNamespace(augmentation=Augmentation({"gridmask": op})))


def test_gridmask_ramp_rises_linearly_then_holds():
    """p = 0.8 over 4 epochs: 0, 0.2, 0.4, 0.6, then 0.8 from epoch 4 on (PaddleClas's set_prob)."""
    op = GridMask(prob=0.8)
    ramp, module = GridMaskRamp(epochs=4), SimpleNamespace(log=lambda *a, **k: None)
    ramp.on_fit_start(_fake_trainer(op), module)
    assert op.prob == 0.0
    seen = []
    for epoch in range(7):
        ramp.on_train_epoch_start(_fake_trainer(op, epoch), module)
        seen.append(op.prob)
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])


def test_gridmask_ramp_state_resumes_the_ramp():
    """state_dict after epoch 2 loaded into a fresh callback and op: the op gets the saved probability at
    fit start, and the next epoch continues the ramp (not from 0, not from the config's p)."""
    module = SimpleNamespace(log=lambda *a, **k: None)
    op, ramp = GridMask(prob=0.8), GridMaskRamp(epochs=4)
    ramp.on_fit_start(_fake_trainer(op), module)
    for epoch in range(3):
        ramp.on_train_epoch_start(_fake_trainer(op, epoch), module)
    state = ramp.state_dict()
    assert state["epoch"] == 2 and state["prob"] == pytest.approx(0.4)

    fresh_op, fresh = GridMask(prob=0.8), GridMaskRamp(epochs=4)
    fresh.load_state_dict(state)
    fresh.on_fit_start(_fake_trainer(fresh_op), module)
    assert fresh_op.prob == pytest.approx(0.4)
    fresh.on_train_epoch_start(_fake_trainer(fresh_op, 3), module)
    assert fresh_op.prob == pytest.approx(0.6)


def test_gridmask_ramp_needs_a_gridmask_op():
    with pytest.raises(AutoclsError, match="augmentation=gridmask"):
        GridMaskRamp(epochs=2).on_fit_start(SimpleNamespace(datamodule=SimpleNamespace(augmentation=Augmentation())), None)


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentation_configs_compose_instantiate_and_run_on_digits(compose_train, name):
    """Every configs/augmentation/*.yaml composes into train.yaml, instantiates, and augments (and mixes)
    a 1-channel 8x8 digits batch, keeping its shape; the op configs come after the standard crop."""
    cfg = compose_train([f"augmentation={name}"])
    augmentation = instantiate(cfg.augmentation)
    if name not in ("none", "standard", "standard_rrc"):
        assert list(augmentation.ops)[:2] == ["crop", "hflip"]
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    out = augmentation(x)
    views = 3 if name == "augmix" and cfg.augmentation.ops.augmix.jsd else 1
    assert out.shape == (16 * views, 1, 8, 8)
    images, targets = augmentation.mix(out, y, 10)
    assert images.shape == out.shape
    if cfg.augmentation.get("mixing"):
        assert targets.shape == (16, 10)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        (["augmentation=autoaugment", "augmentation.ops.autoaugment.policy=foo"], "one of imagenet, cifar10, svhn"),
        (["augmentation=randaugment", "augmentation.ops.randaugment.magnitude=31"], "integer in [0, 10]"),
        (["augmentation=gridmask", "augmentation.ops.gridmask.prob=1.5"], "GridMask.prob=1.5"),
        (["augmentation=random_erasing", "augmentation.ops.random_erasing.EPSILON=-0.1"], "in [0.0, 1.0]"),
        (["augmentation=mixup", "augmentation.mixing.switch_prob=2"], "switch_prob=2"),
        (["augmentation=cutout", "augmentation.ops.cutout.length=16.0"], "fraction of the image side"),
    ],
)
def test_bad_parameters_fail_at_instantiation_in_one_sentence(compose_train, override, fragment):
    cfg = compose_train(override)
    with pytest.raises(Exception) as err:
        instantiate(cfg.augmentation)
    user_error = find_user_error(err.value)
    assert user_error is not None and "\n" not in str(user_error)
    assert fragment in str(user_error)


def test_randaugment_cutmix_trains_one_epoch_on_digits(compose_train):
    """augmentation=randaugment_cutmix on the default digits run (1-channel 8x8) trains end to end."""
    metrics = train(compose_train(["augmentation=randaugment_cutmix", "trainer.max_epochs=1"]))
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert math.isfinite(metrics["train/loss_epoch"])


class _ProbDataset(torch.utils.data.Dataset):
    """Reports the GridMask probability a DataLoader worker sees."""

    def __init__(self, op: GridMask) -> None:
        self.op = op

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(self.op.prob)


def test_gridmask_prob_updates_reach_persistent_workers():
    """Streamed data runs GridMask in persistent worker processes that hold a copy of the op: a
    probability set later in the main process (by the ramp) is what the workers use."""
    op = GridMask(prob=0.0)
    loader = torch.utils.data.DataLoader(_ProbDataset(op), batch_size=2, num_workers=1, persistent_workers=True)
    assert next(iter(loader)).tolist() == [0.0, 0.0]
    op.prob = 0.5
    assert next(iter(loader)).tolist() == [0.5, 0.5]
