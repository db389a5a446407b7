"""Distillation: losses against closed forms, the frozen teacher, student checkpoints that evaluate and
export without the teacher, unlabeled images kept away from labels, the teacher-logit cache, and the
one-sentence errors for bad teachers and settings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from teacher_checkpoints import write_teacher_checkpoint
from torch.nn import functional as F

from src.datamodules.unlabeled import (
    UNLABELED,
    UnlabeledBatches,
    join_parts,
    pool_order,
)
from src.eval import evaluate
from src.lit_models.teacher import Teacher, check_teacher_fits
from src.lit_models.teacher_cache import TeacherLogitCache
from src.losses.cross_entropy import CrossEntropyLoss
from src.losses.distillation import (
    DistillationLoss,
    js_divergence,
    kd_divergence,
    symmetric_kl_divergence,
)
from src.train import train
from src.utils.errors import AutoclsError, find_user_error
from src.utils.instantiate import build_datamodule

C = 5
DIGITS = {"num_classes": 10, "class_names": [str(i) for i in range(10)], "in_chans": 1, "image_size": 8,
          "mean": [0.3059], "std": [0.3761]}


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, C, generator=gen) * 3, torch.randn(6, C, generator=gen) * 3


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _kl(p, q):
    """KL(p || q) per row."""
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


# --- losses against closed forms -----------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_is_t_squared_kl_from_the_teacher(logits, temperature):
    s, t = logits
    p_s, p_t = _softmax(s.double().numpy() / temperature), _softmax(t.double().numpy() / temperature)
    expected = temperature**2 * _kl(p_t, p_s).mean()  # batchmean: summed over classes, mean over samples
    assert kd_divergence(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)
    # the direction matters: KL(student || teacher) is another number for these logits
    assert abs(temperature**2 * _kl(p_s, p_t).mean() - expected) > 1e-2


def test_kd_loss_mixes_kl_and_cross_entropy_by_alpha(logits):
    s, t = logits
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    alpha, T = 0.7, 4.0
    p_s, p_t = _softmax(s.double().numpy() / T), _softmax(t.double().numpy() / T)
    ce = -np.log(_softmax(s.double().numpy())[np.arange(6), y.numpy()]).mean()
    expected = alpha * T**2 * _kl(p_t, p_s).mean() + (1 - alpha) * ce
    loss = DistillationLoss("kl", temperature=T, alpha=alpha)(s, t, y, hard_loss=CrossEntropyLoss())
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_js_divergence_closed_form_symmetric_and_bounded(logits):
    s, t = logits
    p, q = _softmax(s.double().numpy()), _softmax(t.double().numpy())
    m = (p + q) / 2
    expected = (0.5 * _kl(p, m) + 0.5 * _kl(q, m)).mean()
    assert js_divergence(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert js_divergence(t, s).item() == pytest.approx(expected, rel=1e-5)
    assert js_divergence(s, s).item() == pytest.approx(0.0, abs=1e-6)
    far = torch.tensor([[100.0, -100.0]]), torch.tensor([[-100.0, 100.0]])
    assert js_divergence(*far).item() == pytest.approx(math.log(2), rel=1e-5)  # disjoint supports: log 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_symmetric_kl_is_paddleclas_ssld_loss(logits, temperature):
    s, t = logits
    p_s, p_t = _softmax(s.double().numpy() / temperature), _softmax(t.double().numpy() / temperature)
    # PaddleClas JSDivLoss._jsdiv: (KL(p_t || p_s) + KL(p_s || p_t)) / 2, summed over classes
    expected = temperature**2 * (0.5 * _kl(p_t, p_s) + 0.5 * _kl(p_s, p_t)).mean()
    assert symmetric_kl_divergence(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert symmetric_kl_divergence(t, s, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_near_agreement_sym_kl_pulls_like_kl_and_js_four_times_weaker(logits):
    # why the SSLD recipe uses sym_kl: for a student close to the teacher, the gradient on the student's
    # logits is (p_s - p_t) for KL and sym_kl, and a quarter of it for the textbook JS
    _, t = logits
    s = t + 0.02 * torch.randn(t.shape, generator=torch.Generator().manual_seed(3))
    grads = {}
    for name, fn in {"kl": kd_divergence, "sym_kl": symmetric_kl_divergence, "js": js_divergence}.items():
        x = s.clone().requires_grad_()
        fn(x, t).backward()
        grads[name] = x.grad
    scale = grads["kl"].abs().max()  # second-order terms are O(0.02) of the first-order ones
    assert (grads["sym_kl"] - grads["kl"]).abs().max() < 0.05 * scale
    assert (4 * grads["js"] - grads["kl"]).abs().max() < 0.05 * scale
    assert (grads["js"] - grads["kl"]).abs().max() > 0.5 * scale  # and JS really is the weaker pull


def test_ssld_and_logits_only_distillation_ignore_the_labels(logits):
    s, t = logits
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for divergence in ("js", "sym_kl", "kl"):
        loss = DistillationLoss(divergence, temperature=1.0, alpha=1.0)
        without = loss(s, t)  # no labels at all
        assert loss(s, t, y, hard_loss=CrossEntropyLoss()).item() == without.item()
        assert loss(s, t, torch.full_like(y, UNLABELED), hard_loss=CrossEntropyLoss()).item() == without.item()
        assert without.item() == pytest.approx(loss.soft_term(s, t).item())


def test_unlabeled_rows_never_reach_the_hard_label_loss(logits):
    s, t = logits
    labelled_y = torch.tensor([0, 1, 2, 3])
    y = torch.cat([labelled_y, torch.full((2,), UNLABELED)])
    loss = DistillationLoss("kl", temperature=2.0, alpha=0.5)
    ce = CrossEntropyLoss()
    assert loss.hard_term(s, y, ce).item() == pytest.approx(F.cross_entropy(s[:4], labelled_y).item(), rel=1e-6)
    total = loss(s, t, y, hard_loss=ce)
    assert total.item() == pytest.approx(0.5 * kd_divergence(s, t, 2.0).item() + 0.5 * F.cross_entropy(s[:4], labelled_y).item(), rel=1e-6)
    # a batch of unlabeled images only: the hard term is 0 and still has a gradient path
    hard = loss.hard_term(s.requires_grad_(), torch.full((6,), UNLABELED), ce)
    assert hard.item() == 0.0 and hard.requires_grad


def test_soft_mixing_targets_feed_the_hard_label_term(logits):
    s, t = logits
    soft = torch.softmax(torch.randn(6, C, generator=torch.Generator().manual_seed(2)), dim=1)
    loss = DistillationLoss("kl", temperature=4.0, alpha=0.25)
    expected = 0.25 * kd_divergence(s, t, 4.0) + 0.75 * F.cross_entropy(s, soft)
    assert loss(s, t, soft, hard_loss=CrossEntropyLoss()).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"divergence": "mse"}, "kl .*sym_kl .*or js"),
    ({"alpha": 1.5}, r"\[0, 1\]"),
    ({"temperature": 0.0}, "> 0"),
])
def test_bad_distillation_settings_are_one_sentence(kwargs, match):
    with pytest.raises(AutoclsError, match=match):
        DistillationLoss(**kwargs)


# --- the teacher: frozen, normalised as it was trained, left out of checkpoints ----------------


class _TeacherWatch(pl.Callback):
    """Records whether any teacher module was in training mode while the student trained."""

    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(any(m.training for m in pl_module.teacher.modules()))


def _distil_cfg(compose_train, teacher: Path, *extra: str, train_batches: float = 3):
    """digits_kd with `teacher`, a few batches per epoch (1.0: all)."""
    return compose_train([
        "experiment=digits_kd", f"model.teacher_ckpt={teacher}", "logger=none", "trainer.max_epochs=2",
        f"+trainer.limit_train_batches={train_batches}", "+trainer.limit_val_batches=2", *extra,
    ])


def test_teacher_stays_frozen_and_out_of_the_student_checkpoint(compose_train, tmp_path):
    # a teacher trained with other normalisation constants than digits.yaml's
    other = {**DIGITS, "mean": [0.1], "std": [0.5]}
    teacher_path = write_teacher_checkpoint(tmp_path / "teacher.ckpt", other, width=4)
    cfg = _distil_cfg(compose_train, teacher_path, "model.student_lr_mult=0.1")
    datamodule = build_datamodule(cfg)
    model = instantiate(cfg.model)
    student_before = {k: v.clone() for k, v in model.net.state_dict().items()}
    watch = _TeacherWatch()
    trainer = pl.Trainer(**{k: v for k, v in cfg.trainer.items() if k != "_target_"}, callbacks=[watch], logger=False,
                         enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule)

    teacher_weights = torch.load(teacher_path, weights_only=False)["state_dict"]
    own = model.teacher.state_dict()
    assert set(own) == {k.removeprefix("net.") for k in teacher_weights}
    for key, value in teacher_weights.items():  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(own[key.removeprefix("net.")], value), key
    assert watch.modes and not any(watch.modes)  # eval mode although Lightning called train()
    assert not any(p.requires_grad for p in model.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in model.teacher.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in model.net.state_dict().items())
    # student_lr_mult scales the student's lr: 0.1 x optimizer.lr at the cosine schedule's current factor
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs[0] == pytest.approx(0.1 * cfg.optimizer.lr)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch))

    # the teacher sees images normalised its own way: x_t = (x * std_d + mean_d - mean_t) / std_t
    raw = torch.rand(4, 1, 8, 8)
    x_data = (raw - 0.3059) / 0.3761
    with torch.no_grad():
        expected = model.teacher((raw - 0.1) / 0.5)
        assert torch.allclose(model.teacher_logits(x_data), expected, atol=1e-5)

    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert any(k.startswith("net.") for k in checkpoint["state_dict"])
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)  # a module with a teacher gets its weights back for a strict load
    model.load_state_dict(checkpoint["state_dict"], strict=True)


def test_student_checkpoint_evaluates_loads_and_exports_without_the_teacher(compose_train, compose_eval, tmp_path):
    teacher_path = write_teacher_checkpoint(tmp_path / "teacher" / "teacher.ckpt", DIGITS, width=4)
    metrics = train(_distil_cfg(compose_train, teacher_path, "trainer.max_epochs=1"))
    best = Path(metrics["best_ckpt"])
    checkpoint = torch.load(best, weights_only=False)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    teacher_path.unlink()  # eval, export and prediction must not need the teacher

    ev = evaluate(compose_eval([f"ckpt_path={best}"], out=tmp_path / "eval"))
    assert ev["test/acc"] == pytest.approx(metrics["test/acc"])

    from src.deploy.trained_net import load_trained_net

    trained = load_trained_net(best)
    assert trained.net.num_classes == 10 and trained.net.features[0][0].out_channels == 8  # the width-8 student
    images = torch.randn(3, *trained.input_shape)
    with torch.no_grad():
        logits = trained.net(images)
    assert logits.shape == (3, 10)
    try:
        from src.deploy.onnx_export import export_onnx, verify_onnx
    except ImportError:  # the export module is not in this tree: loading and running is the check
        return
    onnx_path = export_onnx(trained.net, trained.input_shape, tmp_path / "student.onnx", dynamo=False)
    assert verify_onnx(trained.net, onnx_path, images) <= 1e-4


def test_bad_teachers_are_one_sentence(compose_train, tmp_path):
    with pytest.raises(AutoclsError, match=r"model\.teacher_ckpt=.*does not exist"):
        train(_distil_cfg(compose_train, tmp_path / "missing.ckpt"))
    five = write_teacher_checkpoint(tmp_path / "five.ckpt", {**DIGITS, "num_classes": 5, "class_names": list("abcde")})
    with pytest.raises(AutoclsError, match="predicts 5 classes but the data has 10"):
        train(_distil_cfg(compose_train, five))
    cfg = _distil_cfg(compose_train, tmp_path / "unused.ckpt")
    with open_dict(cfg):
        cfg.model.teacher_ckpt = None
    with pytest.raises(AutoclsError, match=r"needs a teacher: pass model\.teacher_ckpt"):
        train(cfg)


def test_teacher_for_other_classes_or_channels_is_refused():
    teacher = Teacher(net=torch.nn.Identity(), num_classes=3, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3,
                      source="model.teacher_ckpt=t.ckpt", class_names=["cat", "dog", "fox"])
    with pytest.raises(AutoclsError, match="calls class 1 'dog' but the data calls it 'owl'"):
        check_teacher_fits(teacher, 3, 3, ["cat", "owl", "fox"], 32)
    with pytest.raises(AutoclsError, match="takes 3-channel images but the data has 1"):
        check_teacher_fits(teacher, 3, 1, None, 32)
    check_teacher_fits(teacher, 3, 3, ["cat", "dog", "fox"], 32)


def test_timm_teacher_needs_weights_for_the_data_classes(tmp_path):
    import timm

    from src.lit_models.teacher import timm_teacher

    net = timm.create_model("test_resnet", num_classes=10)
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    teacher = timm_teacher("test_resnet", num_classes=10, pretrained_file=str(tmp_path / "weights.pth"))
    assert all(torch.equal(teacher.net.state_dict()[k], v) for k, v in net.state_dict().items())
    with pytest.raises(AutoclsError, match="predict 10 classes but the data has 7"):
        timm_teacher("test_resnet", num_classes=7, pretrained_file=str(tmp_path / "weights.pth"))


# --- unlabeled images ------------------------------------------------------------------------------


def test_unlabeled_order_uses_every_image_before_repeating_and_follows_seed_and_epoch():
    order = pool_order(10, 25, seed=3, epoch=0)
    assert sorted(order[:10].tolist()) == list(range(10)) and sorted(order[10:20].tolist()) == list(range(10))
    assert torch.equal(order, pool_order(10, 25, seed=3, epoch=0))
    assert not torch.equal(order, pool_order(10, 25, seed=3, epoch=1))
    images = torch.arange(10).view(10, 1, 1, 1).float()
    ranks = [list(UnlabeledBatches(images, per_batch=2, num_batches=2, rank=r, world_size=2)) for r in (0, 1)]
    seen = [int(v) for batches in ranks for x, y in batches for v in x.flatten()]
    assert len(seen) == 8 and len(set(seen)) == 8  # the two ranks draw disjoint shares
    assert all((y == UNLABELED).all() for batches in ranks for _, y in batches)


def _first_training_batch(datamodule):
    loader = datamodule.train_dataloader()
    batch = next(iter(loader))
    batch = batch[0] if isinstance(batch, tuple) and isinstance(batch[0], dict) else batch
    return join_parts(batch)


def test_digits_batches_carry_unlabeled_train_images_and_distil(compose_train, tmp_path):
    teacher_path = write_teacher_checkpoint(tmp_path / "teacher.ckpt", DIGITS, width=4)
    cfg = _distil_cfg(compose_train, teacher_path, "+data/unlabeled=train_images", "data.unlabeled.ratio=0.5",
                      "model.distillation.alpha=0.5", "trainer.max_epochs=1")
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    images, labels = _first_training_batch(datamodule)
    assert images.shape[0] == 64 + 32 and (labels[:64] >= 0).all() and (labels[64:] == UNLABELED).all()
    train_rows = {bytes(x.numpy()) for x in datamodule.splits["train"].images}
    assert all(bytes(x.numpy()) in train_rows for x in images[64:])  # the train images, labels dropped
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["test/acc"] <= 1.0


def test_unlabeled_rows_stay_out_of_the_accuracy(compose_train, tmp_path):
    from torchmetrics.classification import MulticlassAccuracy

    model = instantiate(_distil_cfg(compose_train, tmp_path / "unused.ckpt").model)
    # identity student and teacher: the batch's "images" are the logits the student predicts
    model.net, model.teacher = torch.nn.Identity(), torch.nn.Identity()
    model.train_metrics["acc"] = MulticlassAccuracy(3, top_k=1, average="micro")
    model.train_metrics["acc_top5"] = MulticlassAccuracy(3, top_k=3, average="micro")
    model.log = lambda *args, **kwargs: None  # no trainer to log to
    model.optimizers = lambda: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [5.0, 0, 0]])
    model.training_step((logits, torch.tensor([0, 1, UNLABELED, UNLABELED])), 0)
    # only the two labelled rows count (both right); a -1 label would be an error or a miss
    assert model.train_metrics["acc"].compute().item() == 1.0


def test_unlabeled_folder_in_memory_and_streamed(tmp_path):
    from PIL import Image

    from src.datamodules.folder import ImageFolderDataModule
    from src.datamodules.unlabeled import UnlabeledImages

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "data" / split / cls / f"{i}.png")
    extra = tmp_path / "extra" / "deep" / "er"
    extra.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 16, 3), dtype=np.uint8)).save(extra / f"{i}.jpg")
    (tmp_path / "extra" / "notes.txt").write_text("not an image")
    for in_memory in (True, False):
        datamodule = ImageFolderDataModule(
            data_dir=str(tmp_path / "data"), image_size=8, batch_size=4, val_fraction=0.25, in_memory=in_memory,
            num_workers=0, unlabeled=UnlabeledImages(data_dir=str(tmp_path / "extra"), ratio=0.5))
        datamodule.setup()
        images, labels = _first_training_batch(datamodule)
        assert images.shape == (6, 3, 8, 8)
        assert labels[:4].min() >= 0 and (labels[4:] == UNLABELED).all()
        assert len(datamodule.unlabeled_pool()) == 5
        assert [s.path for s in datamodule.skipped_files] == [str(tmp_path / "extra" / "notes.txt")]
        # the data module's own transfer hook joins the pair (a folder module once mistook the dict for a tuple)
        raw = next(iter(datamodule.train_dataloader()))
        raw = raw[0] if isinstance(raw, tuple) and isinstance(raw[0], dict) else raw
        x, y = datamodule.on_after_batch_transfer(raw, 0)
        assert x.dtype == torch.float32 and x.shape == (6, 3, 8, 8) and (y[4:] == UNLABELED).all()
    # a DARTS-style search on a folder: {"weights": batch, "arch": batch}, each part normalised
    datamodule = ImageFolderDataModule(data_dir=str(tmp_path / "data"), image_size=8, batch_size=2, val_fraction=0.25,
                                       num_workers=0, search_split=0.5)
    datamodule.setup()
    raw = next(iter(datamodule.train_dataloader()))
    raw = raw[0] if isinstance(raw, tuple) and isinstance(raw[0], dict) else raw
    halves = datamodule.on_after_batch_transfer(raw, 0)
    assert set(halves) == {"weights", "arch"} and all(x.dtype == torch.float32 for x, _ in halves.values())


def test_unlabeled_data_misuse_is_one_sentence(compose_train, tmp_path):
    # a plain classifier cannot learn from images without labels
    cfg = compose_train(["+data/unlabeled=train_images", "logger=none", "trainer.max_epochs=1",
                         "+trainer.limit_train_batches=1"])
    with pytest.raises(AutoclsError, match="only a teacher can supervise"):
        train(cfg)
    with pytest.raises(Exception) as err:  # Hydra wraps what the constructor raises
        build_datamodule(compose_train(["+data/unlabeled=train_images", "augmentation=mixup"]))
    assert "cannot be combined with batch mixing" in str(find_user_error(err.value))
    digits = build_datamodule(compose_train(["+data/unlabeled=folder", f"data.unlabeled.data_dir={tmp_path}"]))
    digits.setup()
    with pytest.raises(AutoclsError, match="holds no image files"):
        digits.unlabeled_pool()
    with pytest.raises(Exception) as err:
        build_datamodule(compose_train(["+data/unlabeled=train_images", "data.unlabeled.ratio=0"]))
    assert "ratio=0 must be > 0" in str(find_user_error(err.value))


# --- the teacher-logit cache ------------------------------------------------------------------------


def test_image_keys_do_not_depend_on_the_batch():
    cache = TeacherLogitCache()
    images = torch.randn(16, 3, 8, 8)
    keys = cache.image_keys(images)
    assert torch.equal(keys[5:9], cache.image_keys(images[5:9]))
    assert len(set(keys.tolist())) == 16
    nudged = images.clone()
    nudged[0, 0, 0, 0] += 1 / 255 / 0.25  # one uint8 step of a channel with std 0.25
    assert cache.image_keys(nudged)[0] != keys[0]


def test_cached_teacher_logits_match_and_spare_the_teacher_after_epoch_one(compose_train, tmp_path):
    teacher_path = write_teacher_checkpoint(tmp_path / "teacher.ckpt", DIGITS, width=4)
    cfg = _distil_cfg(compose_train, teacher_path, "model.cache_teacher_logits=true", "augmentation=none",
                      "data.batch_size=256", train_batches=1.0)
    datamodule = build_datamodule(cfg)
    model = instantiate(cfg.model)
    seen, cached, hit_rates = [], [], []  # per epoch: images the teacher ran on, cache size, logged hit rate

    class Count(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(0)
            if len(seen) == 1:
                pl_module.teacher.register_forward_hook(lambda m, inputs, out: seen.__setitem__(-1, seen[-1] + len(inputs[0])))

        def on_train_epoch_end(self, trainer, pl_module):
            cache = pl_module.teacher_cache  # the module logs and resets the counts after this hook
            cached.append(len(cache))
            hit_rates.append(cache.hits / cache.lookups)

    trainer = pl.Trainer(**{k: v for k, v in cfg.trainer.items() if k != "_target_"}, logger=False,
                         enable_checkpointing=False, callbacks=[Count()])
    trainer.fit(model, datamodule=datamodule)
    per_epoch = len(trainer.train_dataloader) * 256  # 4 full batches (the last partial one is dropped)
    assert seen[0] == cached[0] == per_epoch and hit_rates[0] == 0.0
    # epoch 2 draws another 1024 of the 1257 images: the teacher runs only on those not seen in epoch 1
    assert seen[1] == cached[1] - cached[0] < 1257 - per_epoch + 1
    assert hit_rates[1] == pytest.approx(1 - seen[1] / per_epoch)
    assert float(trainer.callback_metrics["train/teacher_cache_hit_rate"]) == pytest.approx(hit_rates[1])
    train_images = datamodule.normalize(datamodule.splits["train"].images[:32].float() / 255)
    with torch.no_grad():
        cached_logits = model.teacher_cache.logits(train_images, model.teacher)
        assert torch.allclose(cached_logits, model.teacher(train_images), atol=1e-5)

    random_aug = _distil_cfg(compose_train, teacher_path, "model.cache_teacher_logits=true", "augmentation=standard")
    with pytest.raises(AutoclsError, match="needs augmentation=none"):
        train(random_aug)


def test_unlabeled_pool_leaves_out_the_labelled_subset_and_is_seeded(tmp_path):
    from scripts.make_unlabeled_pool import make_pool

    for cls in ("a", "b"):
        (tmp_path / "full" / cls).mkdir(parents=True)
        (tmp_path / "subset" / cls).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "full" / cls / f"{i}.jpg").write_bytes(bytes([i]))
        for i in range(3):  # the labelled subset holds 0-2 of each class
            (tmp_path / "subset" / cls / f"{i}.jpg").write_bytes(bytes([i]))
    assert make_pool(tmp_path / "full", tmp_path / "subset", 2, tmp_path / "pool") == 4
    picked = sorted(str(p.relative_to(tmp_path / "pool")) for p in (tmp_path / "pool").rglob("*.jpg"))
    assert len(picked) == 4 and all(int(Path(p).stem) >= 3 for p in picked)
    make_pool(tmp_path / "full", tmp_path / "subset", 2, tmp_path / "again")
    assert picked == sorted(str(p.relative_to(tmp_path / "again")) for p in (tmp_path / "again").rglob("*.jpg"))
    with pytest.raises(SystemExit, match="lower --per-class"):
        make_pool(tmp_path / "full", tmp_path / "subset", 4, tmp_path / "too_many")
