"""Tests for src.models: parameter counts against the papers, the timm-style model contract,
user-facing errors, and loading local weights into timm models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src.models.resnet_cifar import resnet_cifar
from src.models.small_cnn import SmallCNN
from src.utils.errors import AutoclsError


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- parameter counts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "exact", "paper", "rounding"),
    [
        # He et al. 2016, section 4.2: 0.27M / 0.85M / 1.7M, i.e. rounded to 0.01M / 0.01M / 0.1M.
        # The exact numbers are for option-A shortcuts; 1x1 projections at the two downsampling
        # blocks would add 2,752 (272,474 for ResNet-20).
        (20, 269_722, 0.27e6, 0.01e6),
        (56, 853_018, 0.85e6, 0.01e6),
        (110, 1_727_962, 1.7e6, 0.1e6),
        # kuangliu/pytorch-cifar ResNet-18: 11.17M.
        (18, 11_173_962, 11.17e6, 0.01e6),
    ],
)
def test_param_counts_match_papers(depth, exact, paper, rounding):
    count = n_params(resnet_cifar(depth, num_classes=10))
    assert count == pytest.approx(paper, abs=rounding / 2)
    assert count == exact


def test_he_resnets_have_parameter_free_shortcuts():
    # Option A: a ResNet has exactly the parameters of its plain counterpart, i.e. no conv
    # outside the 6n+1 3x3 convs.
    model = resnet_cifar(32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31
    assert all(conv.kernel_size == (3, 3) for conv in convs)


def test_small_cnn_stays_small():
    assert 50_000 <= n_params(SmallCNN()) <= 150_000


# --- shapes and the timm contract ---------------------------------------------------------------

CONTRACT_CASES = [
    pytest.param(lambda: SmallCNN(num_classes=10, in_chans=1), (1, 8, 8), 128, id="small_cnn-8x8"),
    pytest.param(lambda: SmallCNN(num_classes=10, in_chans=3), (3, 32, 32), 128, id="small_cnn-32x32"),
    pytest.param(lambda: resnet_cifar(20, num_classes=10), (3, 32, 32), 64, id="resnet20"),
    pytest.param(lambda: resnet_cifar(18, num_classes=10), (3, 32, 32), 512, id="resnet18"),
    pytest.param(lambda: resnet_cifar(20, num_classes=10, in_chans=1), (1, 28, 28), 64, id="resnet20-1ch-odd"),
]


@pytest.mark.parametrize(("make", "input_shape", "num_features"), CONTRACT_CASES)
def test_model_contract(make, input_shape, num_features):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, *input_shape)
    assert model.num_classes == 10
    assert model.num_features == num_features

    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert logits.shape == (2, 10)
        assert features.ndim == 4 and features.shape[:2] == (2, num_features)
        assert pooled.shape == (2, num_features)
        torch.testing.assert_close(model.forward_head(features), logits)
        torch.testing.assert_close(model.get_classifier()(pooled), logits)

    model.reset_classifier(3)
    assert model.num_classes == 3
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model(x).shape == (2, 3)

    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == (2, num_features)


def test_resnet_downsamples_4x_and_trains():
    model = resnet_cifar(20, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    assert model.forward_features(x).shape == (4, 64, 8, 8)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet_init():
    model = resnet_cifar(20)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)


def test_resnet_forwards_kwargs():
    model = resnet_cifar(depth=20, num_classes=7, in_chans=1, drop_rate=0.5)
    assert model.head_drop.p == 0.5
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("depth", [19, 50, 1202])
def test_unsupported_depth_lists_supported(depth):
    with pytest.raises(AutoclsError, match=r"18, 20, 32, 44, 56, 110") as info:
        resnet_cifar(depth)
    assert str(depth) in str(info.value)


# --- timm ---------------------------------------------------------------------------------------

timm = pytest.importorskip("timm")
from src.models.timm_net import create_timm_net

TINY = "resnet10t"


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(AutoclsError) as info:
        create_timm_net("resnet181", num_classes=10)
    message = str(info.value)
    assert message.startswith("Unknown timm model 'resnet181'; close names: resnet18")
    assert "resnet101" in message and "timm.list_models()" in message


def test_timm_net_contract_with_one_channel():
    model = create_timm_net(TINY, num_classes=4, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model(x))
        assert model(x).shape == (2, 4)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    assert model.conv1[0].in_channels == 1


def test_timm_net_passes_kwargs():
    model = create_timm_net(TINY, num_classes=4, drop_rate=0.3)
    assert model.drop_rate == 0.3


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory):
    """A state dict of an ImageNet-shaped (1000-class) model saved to disk, and the dict itself."""
    torch.manual_seed(0)
    state_dict = timm.create_model(TINY, num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("weights") / f"{TINY}.pth"
    torch.save(state_dict, path)
    return path, state_dict


def assert_backbone_equal(model: nn.Module, saved: dict, skip: str = "fc."):
    loaded = model.state_dict()
    for key, value in saved.items():
        if not key.startswith(skip):
            torch.testing.assert_close(loaded[key], value, msg=f"{key} was not loaded")


def test_pretrained_file_resets_classifier_for_new_classes(imagenet_weights):
    path, saved = imagenet_weights
    model = create_timm_net(TINY, num_classes=5, pretrained_file=str(path))
    assert_backbone_equal(model, saved)
    assert model.get_classifier().out_features == 5
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept alive


def test_pretrained_file_keeps_classifier_of_same_size(tmp_path):
    # A file fine-tuned on 5 classes loaded for 5 classes must keep its head (timm alone compares
    # with the registry's 1000 classes and would drop it), from a checkpoint dict as well.
    torch.manual_seed(1)
    saved = timm.create_model(TINY, num_classes=5).state_dict()
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": saved, "epoch": 3}, path)
    model = create_timm_net(TINY, num_classes=5, pretrained_file=str(path))
    assert_backbone_equal(model, saved, skip="<nothing>")


def test_pretrained_file_adapts_stem_to_one_channel(imagenet_weights):
    path, saved = imagenet_weights
    model = create_timm_net(TINY, num_classes=5, in_chans=1, pretrained_file=str(path))
    stem = model.conv1[0].weight
    assert stem.shape[1] == 1
    # timm sums the RGB filters for one channel
    torch.testing.assert_close(stem, saved["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert_backbone_equal(model, {k: v for k, v in saved.items() if k != "conv1.0.weight"})


def test_missing_pretrained_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(AutoclsError, match="does not exist") as info:
        create_timm_net(TINY, num_classes=5, pretrained_file=str(missing))
    assert str(missing) in str(info.value)


def test_pretrained_file_of_other_architecture(imagenet_weights, tmp_path):
    path, _ = imagenet_weights
    with pytest.raises(AutoclsError, match="do not fit timm model 'resnet14t'"):
        create_timm_net("resnet14t", num_classes=1000, pretrained_file=str(path))


def test_pretrained_file_with_wrapper_prefix_is_not_silently_ignored(imagenet_weights, tmp_path):
    _, saved = imagenet_weights
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in saved.items()}}, path)
    with pytest.raises(AutoclsError, match="No tensor in .* matches the model"):
        create_timm_net(TINY, num_classes=5, pretrained_file=str(path))
