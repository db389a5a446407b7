"""Losses against closed forms and references: focal loss, temperature, label smoothing, class weights.

(Plain cross-entropy with smoothing and soft targets is pinned in test_units.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch.nn import functional as F

from src.losses.base import balanced_class_weights
from src.losses.cross_entropy import CrossEntropyLoss
from src.losses.focal import FocalLoss
from src.utils.errors import AutoclsError

C = 5


@pytest.fixture
def logits():
    return torch.randn(12, C, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def int_target():
    return torch.tensor([0, 1, 2, 3, 4, 4, 1, 0, 2, 2, 3, 0])


@pytest.fixture
def soft_target():
    return torch.softmax(torch.randn(12, C, generator=torch.Generator().manual_seed(1)), dim=1)


# --- focal loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target_kind", ["int", "soft"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"label_smoothing": 0.1}, {"temperature": 2.0}, {"class_weights": [0.5, 1.0, 2.0, 3.0, 0.1]}],
)
def test_focal_with_gamma_0_equals_cross_entropy(logits, int_target, soft_target, target_kind, kwargs):
    """gamma=0, alpha=null reduces focal loss to cross-entropy with the same other arguments."""
    target = int_target if target_kind == "int" else soft_target
    ce = CrossEntropyLoss(num_classes=C, **kwargs)(logits, target)
    focal = FocalLoss(gamma=0.0, alpha=None, num_classes=C, **kwargs)(logits, target)
    assert focal.item() == pytest.approx(ce.item(), abs=1e-6)


def test_focal_value_by_hand():
    """gamma=2, alpha per class on one known logit vector: -alpha_t (1 - p_t)^2 log p_t."""
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    z = math.exp(2) + math.exp(1) + 1
    p_t = math.exp(1) / z  # the target is class 1
    expected = -0.5 * (1 - p_t) ** 2 * math.log(p_t)
    loss = FocalLoss(gamma=2.0, alpha=[0.25, 0.5, 0.25], num_classes=3)(logits, torch.tensor([1]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_soft_targets_sum_over_classes():
    """Soft targets: sum_c -q_c (1 - p_c)^gamma log p_c, per sample, averaged over the batch."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    q = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5]])
    p = torch.softmax(logits.double(), 1)
    expected = (-(q * (1 - p) ** 2 * p.log()).sum(1)).mean()
    assert FocalLoss(gamma=2.0)(logits, q).item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_down_weights_easy_examples():
    """The (1 - p)^gamma factor: a confidently right example loses far more of its loss than a wrong one."""
    easy, hard = torch.tensor([[6.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    target = torch.tensor([0])
    ratio = lambda x: (FocalLoss(gamma=2.0)(x, target) / CrossEntropyLoss()(x, target)).item()
    assert ratio(easy) < 1e-4 < 0.5 < ratio(hard)


def test_focal_scalar_alpha_weights_binary_classes():
    """alpha=a in a binary task weights class 1 by a and class 0 by 1 - a."""
    logits = torch.tensor([[0.3, -0.2], [1.0, 2.0]])
    target = torch.tensor([0, 1])
    assert FocalLoss(alpha=0.25, num_classes=2)(logits, target).item() == pytest.approx(
        FocalLoss(alpha=[0.75, 0.25], num_classes=2)(logits, target).item()
    )
    with pytest.raises(AutoclsError, match="give loss.alpha one value per class"):
        FocalLoss(alpha=0.25, num_classes=10)


def test_focal_gradient_is_finite_for_gamma_below_1_at_certainty():
    """p rounding to 1 must not give 0 * inf = NaN gradients when 0 < gamma < 1."""
    logits = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    FocalLoss(gamma=0.5)(logits, torch.tensor([0])).backward()
    assert torch.isfinite(logits.grad).all()


# --- temperature and label smoothing -------------------------------------------------------------


def test_temperature_divides_logits():
    """T=2 on logits [2, 0]: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)."""
    loss = CrossEntropyLoss(temperature=2.0)(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_label_smoothing_closed_form():
    """logits [0, 0, ln 2] (p = [1/4, 1/4, 1/2]), target 2, eps=0.3: q = [0.1, 0.1, 0.8],
    loss = 0.2 ln 4 + 0.8 ln 2 = 1.2 ln 2."""
    logits = torch.tensor([[0.0, 0.0, math.log(2)]])
    loss = CrossEntropyLoss(label_smoothing=0.3)(logits, torch.tensor([2]))
    assert loss.item() == pytest.approx(1.2 * math.log(2), rel=1e-6)


@pytest.mark.parametrize(("kwargs", "name"), [({"temperature": 0.0}, "temperature"), ({"gamma": -1.0}, "gamma")])
def test_invalid_values_are_rejected(kwargs, name):
    with pytest.raises(AutoclsError, match=f"loss.{name}="):
        FocalLoss(**kwargs)


# --- class weights -------------------------------------------------------------------------------


def test_balanced_weights_equal_sklearn():
    """n_samples / (n_classes * count_c) on counts [10, 30, 60], as scikit-learn computes it."""
    counts = torch.tensor([10, 30, 60])
    labels = torch.repeat_interleave(torch.arange(3), counts).numpy()
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert torch.allclose(balanced_class_weights(counts), torch.tensor(expected, dtype=torch.float32))
    loss = FocalLoss(class_weights="balanced", num_classes=3)
    assert loss.wants_class_counts and torch.equal(loss.class_weights, torch.ones(3))
    loss.set_class_counts(counts)
    assert torch.allclose(loss.class_weights, torch.tensor(expected, dtype=torch.float32))
    assert "class_weights" in loss.state_dict()  # saved with the model, restored by eval


def test_balanced_weights_need_every_class():
    with pytest.raises(AutoclsError, match=r"class\(es\) \[1\] have none"):
        balanced_class_weights(torch.tensor([5, 0, 3]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_ce_equals_torch(logits, int_target, smoothing):
    """Integer targets: the weighted mean of F.cross_entropy(weight=...)."""
    weights = [0.5, 1.0, 2.0, 3.0, 0.1]
    ours = CrossEntropyLoss(label_smoothing=smoothing, class_weights=weights, num_classes=C)(logits, int_target)
    ref = F.cross_entropy(logits, int_target, weight=torch.tensor(weights), label_smoothing=smoothing)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    # and it differs from the unweighted loss, so the weights are really applied
    assert abs(ours.item() - CrossEntropyLoss(smoothing)(logits, int_target).item()) > 1e-3


@pytest.mark.parametrize("loss_cls", [CrossEntropyLoss, FocalLoss])
def test_wrong_number_of_class_weights_is_one_sentence(loss_cls):
    with pytest.raises(AutoclsError) as err:
        loss_cls(class_weights=[1.0, 2.0, 3.0], num_classes=10)
    message = str(err.value)
    assert "\n" not in message and "has 3 values but the data has 10 classes" in message


def test_unknown_class_weighting_is_one_sentence():
    with pytest.raises(AutoclsError, match="use null, balanced or a list"):
        CrossEntropyLoss(class_weights="inverse", num_classes=3)
