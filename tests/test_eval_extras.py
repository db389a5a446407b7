"""Evaluation extras: TTA, expected calibration error, confusion matrix, per-class accuracy, and eval.py."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from src.eval import evaluate
from src.evaluation.calibration import expected_calibration_error
from src.evaluation.confusion import confusion_matrix, per_class_accuracy
from src.evaluation.tta import multicrop_views, tta_logits
from src.train import train
from src.utils.errors import AutoclsError, find_user_error


def test_ece_against_a_hand_computed_value():
    """15 bins of width 1/15. 0.95 -> bin 14 (right), 0.85 -> bin 12 (wrong), 0.65 and 0.62 -> bin 9
    (one right: accuracy 0.5, mean confidence 0.635), 0.30 -> bin 4 (right):
    ECE = (0.05 + 0.85 + 2 * 0.135 + 0.70) / 5 = 0.374."""
    confidences = torch.tensor([0.95, 0.85, 0.65, 0.62, 0.30])
    correct = torch.tensor([True, False, True, False, True])
    assert expected_calibration_error(confidences, correct, n_bins=15) == pytest.approx(0.374, abs=1e-6)


def test_ece_bins_are_right_closed_and_perfect_calibration_is_zero():
    # 2/15 is the upper edge of bin 1: with 0.1 (bin 1) the bin's mean confidence is 0.1167
    edge = torch.tensor([2 / 15, 0.1], dtype=torch.float64)  # float32 would round 2/15 up, past the edge
    assert expected_calibration_error(edge, torch.tensor([True, False]), 15) == pytest.approx(abs(0.5 - (2 / 15 + 0.1) / 2))
    # in each bin the accuracy equals the confidence
    assert expected_calibration_error(torch.tensor([0.5, 0.5, 1.0]), torch.tensor([True, False, True])) == 0.0


def test_ece_matches_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=generator) * 2
    labels = torch.randint(0, 7, (500,), generator=generator)
    probs = logits.softmax(1)
    confidence, prediction = probs.max(1)
    ours = expected_calibration_error(confidence, prediction == labels, n_bins=15)
    reference = multiclass_calibration_error(probs, labels, num_classes=7, n_bins=15, norm="l1")
    assert ours == pytest.approx(float(reference), abs=1e-5)


def test_confusion_matrix_and_per_class_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 2])
    matrix = confusion_matrix(predictions, labels, num_classes=4)
    assert matrix.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    accuracy = per_class_accuracy(matrix)
    assert accuracy[:3].tolist() == pytest.approx([0.5, 2 / 3, 1.0]) and torch.isnan(accuracy[3])


class _RowMean(nn.Module):
    """Logits = per-row means of the first channel: sensitive to vertical layout, blind to mirroring."""

    def forward(self, x):
        return x[:, 0].mean(dim=2)


def test_tta_modes():
    images = torch.randn(2, 3, 8, 8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    net(images)
    assert torch.equal(tta_logits(net, images, "none"), net(images))
    torch.testing.assert_close(tta_logits(net, images, "flip"), (net(images) + net(images.flip(-1))) / 2)
    # a mirror-blind network gains nothing from flipping
    torch.testing.assert_close(tta_logits(_RowMean(), images, "flip"), _RowMean()(images))
    # a constant image looks the same in every crop
    flat = torch.full((1, 3, 8, 8), 0.7)
    torch.testing.assert_close(tta_logits(net, flat, "multicrop"), net(flat))
    with pytest.raises(AutoclsError, match="Unknown tta mode 'rotate'"):
        tta_logits(net, images, "rotate")


def test_multicrop_views_are_corner_and_centre_crops_resized_back():
    images = torch.arange(64.0).view(1, 1, 8, 8)
    views = multicrop_views(images)  # 7x7 crops (87.5% of 8) resized to 8x8, and their mirrors
    assert len(views) == 10 and all(v.shape == images.shape for v in views)
    # corners of the resized crops are the crops' corner pixels: (0,0) for top-left, (7,7) bottom-right
    assert views[0][0, 0, 0, 0] == images[0, 0, 0, 0] and views[6][0, 0, -1, -1] == images[0, 0, -1, -1]
    torch.testing.assert_close(views[1], views[0].flip(-1))


@pytest.fixture(scope="module")
def digits_fit(tmp_path_factory):
    from conftest import compose_config

    out = tmp_path_factory.mktemp("fit")
    return train(compose_config("train.yaml", out, ["trainer.max_epochs=2", "logger=none"]))


def test_eval_writes_extras_and_applies_tta(digits_fit, compose_eval, tmp_path):
    plain = evaluate(compose_eval([f"ckpt_path={digits_fit['best_ckpt']}"], out=tmp_path / "plain"))
    assert plain["test/acc"] == pytest.approx(digits_fit["test/acc"], abs=1e-6) and plain["tta"] == "none"
    assert 0 <= plain["test/ece"] <= 1

    # per-class table: supports sum to the test split, the support-weighted mean is test/acc
    with open(tmp_path / "plain" / "per_class_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class_name"] for r in rows] == [str(i) for i in range(10)]
    total = sum(int(r["support"]) for r in rows)
    assert sum(int(r["correct"]) for r in rows) / total == pytest.approx(plain["test/acc"], abs=1e-6)
    assert plain["test/class_acc/3"] == pytest.approx(float(rows[3]["accuracy"]), abs=1e-6)
    assert plain["test/class_acc_min"] == min(plain[f"test/class_acc/{i}"] for i in range(10))
    assert (tmp_path / "plain" / "confusion_matrix.png").stat().st_size > 1000
    with open(tmp_path / "plain" / "confusion_matrix.csv") as f:
        assert sum(int(v) for row in list(csv.reader(f))[1:] for v in row[1:]) == total

    # TTA: test/acc equals the accuracy of tta_logits computed by hand on the same images
    flip = evaluate(compose_eval([f"ckpt_path={digits_fit['best_ckpt']}", "tta=flip"], out=tmp_path / "flip"))
    from src.deploy.images import datamodule_for, split_images, top1_accuracy
    from src.deploy.trained_net import load_trained_net

    trained = load_trained_net(digits_fit["best_ckpt"])
    images, labels = split_images(datamodule_for(trained.config["data"]), "test")
    expected = top1_accuracy(lambda x: tta_logits(trained.net, x, "flip"), images, labels)
    assert flip["tta"] == "flip" and flip["test/acc"] == pytest.approx(expected, abs=1e-6)
    assert json.loads((tmp_path / "flip" / "metrics.json").read_text())["test/ece"] == pytest.approx(flip["test/ece"])


def test_eval_rejects_unknown_tta(digits_fit, compose_eval, tmp_path):
    with pytest.raises(Exception) as info:
        evaluate(compose_eval([f"ckpt_path={digits_fit['best_ckpt']}", "tta=rotate"]))
    assert "Unknown tta mode 'rotate'" in str(find_user_error(info.value))


def test_extras_skip_modules_without_a_net_unless_tta_is_asked(tmp_path):
    import pytorch_lightning as pl

    from src.evaluation.extras import EvalExtras

    extras = EvalExtras(tmp_path, class_names=["a", "b"])
    extras.on_test_start(trainer=None, pl_module=pl.LightningModule())  # warns, records nothing
    assert not extras._active and extras.metrics == {}
    with pytest.raises(AutoclsError, match="tta=flip needs the LightningModule's `net`"):
        EvalExtras(tmp_path, tta="flip", class_names=["a", "b"]).on_test_start(trainer=None, pl_module=pl.LightningModule())
