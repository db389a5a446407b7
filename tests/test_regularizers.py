"""Disout against its definition, the ramp callback, and the CIFAR ResNets' regulariser options
(drop path, DropBlock, Disout): off means no change, on means a different training forward."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from src.callbacks.disout_ramp import DisoutRamp
from src.models.regularizers import Disout
from src.models.resnet_cifar import resnet_cifar
from src.utils.errors import AutoclsError


def train_forward(module: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return module.train()(x)


def distorted_mask(x_shape, dist_prob: float, block_size: int, seed: int = 0) -> torch.Tensor:
    """Which elements Disout distorts for inputs of `x_shape` after `torch.manual_seed(seed)`.

    The random draws depend only on the shape, so a constant input under the same seed gets the same
    mask; its standard deviation is 0, so its distorted elements come out exactly 0 and its kept
    ones as 1 / kept fraction.
    """
    out = train_forward(Disout(dist_prob, block_size, alpha=1.0), torch.ones(x_shape), seed)
    assert torch.all((out == 0) | (out >= 1))
    return (out == 0).float()


def expected_fraction(h: int, w: int, prob: float, block_size: int) -> float:
    """Expected distorted fraction of an h x w map with DropBlock's seeding: seeds, with probability
    gamma, only where a whole block fits; an element covered by k possible blocks stays intact
    with probability (1 - gamma)^k."""
    bh, bw = min(block_size, h), min(block_size, w)
    gamma = prob * h * w / (bh * bw * (h - bh + 1) * (w - bw + 1))

    def covering(n: int, b: int) -> torch.Tensor:  # block positions covering each index on one axis
        return torch.tensor([min(i, n - b) - max(0, i - b + 1) + 1 for i in range(n)], dtype=torch.float64)

    k = covering(h, bh)[:, None] * covering(w, bw)[None, :]
    return float((1 - (1 - gamma) ** k).mean())


# --- Disout --------------------------------------------------------------------------------------


def test_disout_is_identity_in_eval_mode():
    x = torch.randn(4, 8, 16, 16)
    torch.testing.assert_close(Disout(0.5, 3, alpha=5.0).eval()(x), x, rtol=0, atol=0)


def test_disout_with_zero_prob_is_identity_in_training():
    x = torch.randn(4, 8, 16, 16)
    assert torch.equal(train_forward(Disout(0.0, 3, alpha=5.0), x), x)


@pytest.mark.parametrize(
    ("shape", "dist_prob", "block_size"),
    [
        ((16, 16, 32, 32), 0.1, 5),
        ((16, 16, 32, 32), 0.2, 4),  # even blocks
        ((16, 16, 16, 16), 0.05, 1),  # single elements: plain dropout positions
        ((256, 64, 4, 4), 0.3, 7),  # block larger than the map: whole channels
    ],
)
def test_distorted_fraction_follows_dropblock_gamma(shape, dist_prob, block_size):
    fraction = distorted_mask(shape, dist_prob, block_size).mean().item()
    expected = expected_fraction(shape[2], shape[3], dist_prob, block_size)
    assert abs(expected - dist_prob) < 0.02  # overlaps cost a little, not much
    # The maps hold enough independent blocks for the estimate's std to be about 0.004 or less.
    assert fraction == pytest.approx(expected, abs=0.015)


@pytest.mark.parametrize("block_size", [3, 4])
def test_distorted_elements_form_whole_blocks(block_size):
    """Every distorted element lies in a fully distorted block_size x block_size square (a mask of
    independent elements would have isolated ones)."""
    mask = distorted_mask((4, 8, 24, 24), 0.15, block_size).flatten(0, 1).unsqueeze(1)
    full_windows = (F.avg_pool2d(mask, block_size, stride=1) == 1).float()
    covered = F.conv_transpose2d(full_windows, torch.ones(1, 1, block_size, block_size)) > 0
    assert mask.sum() > 0
    assert torch.equal(covered, mask.bool())


def test_disout_keeps_the_mean():
    """The distortion is zero-mean and the output is divided by the kept fraction, so the mean of a
    feature map with mean 2 stays 2 (without the rescaling it would drop to about 1.6)."""
    disout, x = Disout(0.2, 3, alpha=2.0), torch.randn(32, 8, 16, 16) + 2.0
    outputs = [train_forward(disout, x, seed) for seed in range(20)]
    assert not torch.equal(outputs[0], x)
    assert torch.stack(outputs).mean().item() == pytest.approx(x.mean().item(), abs=0.02)


def test_distortion_replaces_elements_with_noise_scaled_by_channel_std():
    """y = (x * (1 - m) + alpha * sigma_c * z * m) / mean(1 - m): kept elements are rescaled copies, the
    distorted ones zero-mean noise with std alpha * sigma_c (channels of std 1 and 10 here)."""
    shape, alpha = (32, 2, 32, 32), 0.5
    scales = torch.tensor([1.0, 10.0]).view(1, 2, 1, 1)
    checkerboard = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1.0
    x = (scales * checkerboard).expand(shape).contiguous()  # channel c has mean 0, std scales[c]
    mask = distorted_mask(shape, 0.2, 3, seed=1)
    out = train_forward(Disout(0.2, 3, alpha), x, seed=1)
    kept_fraction = 1 - mask.mean()

    kept = mask == 0
    torch.testing.assert_close(out[kept], x[kept] / kept_fraction)
    for c, scale in enumerate(scales.flatten().tolist()):
        noise = out[:, c][mask[:, c] == 1] * kept_fraction / (alpha * scale)
        assert noise.numel() > 4000  # standard errors: 0.016 for the mean, 1.1% for the std
        assert noise.mean().item() == pytest.approx(0.0, abs=0.06)
        assert noise.std().item() == pytest.approx(1.0, rel=0.05)


def test_gradients_reach_kept_elements_only():
    """The distortion is a constant to back-propagation (its std is computed without gradient)."""
    shape = (4, 8, 16, 16)
    mask = distorted_mask(shape, 0.2, 3, seed=2)
    x = torch.randn(shape, requires_grad=True)
    train_forward(Disout(0.2, 3, alpha=1.0), x, seed=2).sum().backward()
    torch.testing.assert_close(x.grad, (1 - mask) / (1 - mask.mean()))


def test_disout_prob_is_settable_and_outside_the_state_dict():
    disout = Disout(0.1, 3)
    disout.dist_prob = 0.25
    assert disout.dist_prob == pytest.approx(0.25)
    assert "dist_prob=0.250" in repr(disout)
    assert disout.state_dict() == {}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"dist_prob": 1.0}, "dist_prob=1.0"), ({"dist_prob": -0.1}, "dist_prob=-0.1"),
     ({"block_size": 0}, "block_size=0"), ({"alpha": -1.0}, "alpha=-1.0")],
)
def test_disout_rejects_values_out_of_range(kwargs, fragment):
    with pytest.raises(AutoclsError, match=fragment):
        Disout(**{"dist_prob": 0.1, **kwargs})


# --- DisoutRamp ----------------------------------------------------------------------------------


def _net_with_disouts() -> nn.Module:
    net = nn.Sequential(Disout(0.1, 3), nn.ReLU(), Disout(0.2, 3))
    net.log = lambda *args, **kwargs: None  # stands in for LightningModule.log
    return net


def test_disout_ramp_rises_linearly_per_step_then_holds():
    net, ramp = _net_with_disouts(), DisoutRamp(steps=4)
    ramp.on_fit_start(SimpleNamespace(global_step=0), net)
    assert [net[0].dist_prob, net[2].dist_prob] == [0.0, 0.0]
    seen = []
    for step in range(6):
        ramp.on_train_batch_start(SimpleNamespace(global_step=step), net, None, step)
        seen.append((net[0].dist_prob, net[2].dist_prob))
    expected = [(0.1 * f, 0.2 * f) for f in (0.0, 0.25, 0.5, 0.75, 1.0, 1.0)]
    assert seen == [pytest.approx(pair) for pair in expected]


def test_disout_ramp_state_resumes_the_ramp():
    net, ramp = _net_with_disouts(), DisoutRamp(steps=4)
    ramp.on_fit_start(SimpleNamespace(global_step=0), net)
    ramp.on_train_batch_start(SimpleNamespace(global_step=2), net, None, 2)
    state = ramp.state_dict()

    fresh_net, fresh = _net_with_disouts(), DisoutRamp(steps=4)  # built with the configured 0.1 / 0.2
    fresh.load_state_dict(state)
    fresh.on_fit_start(SimpleNamespace(global_step=2), fresh_net)
    assert fresh_net[2].dist_prob == pytest.approx(0.1)  # half way, not 0, not the full 0.2
    fresh.on_train_batch_start(SimpleNamespace(global_step=3), fresh_net, None, 0)
    assert fresh_net[2].dist_prob == pytest.approx(0.15)


def test_disout_ramp_needs_disout():
    with pytest.raises(AutoclsError, match="model.net.disout_prob"):
        DisoutRamp(steps=10).on_fit_start(SimpleNamespace(global_step=0), nn.Sequential(nn.ReLU()))


# --- resnet_cifar options ------------------------------------------------------------------------

ALL_OPTIONS = {"drop_path_rate": 0.1, "drop_block_rate": 0.1, "disout_prob": 0.1}
CASES = [
    pytest.param(20, {"drop_path_rate": 0.2}, id="resnet20-drop_path"),
    pytest.param(20, {"drop_block_rate": 0.2, "drop_block_size": 3}, id="resnet20-dropblock"),
    pytest.param(20, {"disout_prob": 0.2, "disout_block_size": 3, "disout_alpha": 1.0}, id="resnet20-disout"),
    pytest.param(20, ALL_OPTIONS, id="resnet20-all"),
    pytest.param(18, ALL_OPTIONS, id="resnet18-all"),  # projection shortcuts, four stages
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("depth", "options"), CASES)
def test_regularisers_change_training_only(depth, options):
    """Same parameters (the state dict loads strictly both ways), the same eval outputs bit for bit,
    different training outputs."""
    torch.manual_seed(0)
    plain, regularised = resnet_cifar(depth), resnet_cifar(depth, **options)
    plain.load_state_dict(resnet_cifar(depth, **options).state_dict())  # strict: the same keys
    regularised.load_state_dict(plain.state_dict())
    assert n_params(regularised) == n_params(plain)
    x = torch.randn(4, 3, 16, 16)  # small: the maps of the last stages are 4x4 (8x8) and 2x2 (4x4)
    with torch.no_grad():
        assert torch.equal(regularised.eval()(x), plain.eval()(x))
        assert not torch.allclose(train_forward(regularised, x), train_forward(plain, x), atol=1e-3)


def test_drop_path_rate_rises_linearly_over_the_blocks():
    model = resnet_cifar(20, drop_path_rate=0.2)
    blocks = [block for stage in model.stages for block in stage]
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in blocks]
    assert isinstance(blocks[0].drop_path, nn.Identity)
    assert rates == pytest.approx(torch.linspace(0, 0.2, 9).tolist())


@pytest.mark.parametrize(("depth", "stages"), [(20, [1, 2]), (18, [2, 3])])
def test_dropblock_and_disout_sit_in_the_last_two_stages(depth, stages):
    model = resnet_cifar(depth, drop_block_rate=0.1, disout_prob=0.1)
    for index, stage in enumerate(model.stages):
        names = {type(m).__name__ for m in stage.modules()}
        assert ({"DropBlock2d", "Disout"} <= names) == (index in stages), index
    assert sum(isinstance(m, Disout) for m in model.modules()) == 2 * sum(len(model.stages[i]) for i in stages)


def test_resnet_rejects_rates_out_of_range():
    with pytest.raises(AutoclsError, match=r"model\.net\.drop_block_rate=1\.5 must be in \[0, 1\)"):
        resnet_cifar(20, drop_block_rate=1.5)


def test_resnet_config_takes_the_options(compose_train):
    cfg = compose_train(["model/net=resnet_cifar", "model.net.drop_path_rate=0.1",
                         "model.net.drop_block_rate=0.1", "model.net.disout_prob=0.1"])
    model = instantiate(cfg.model.net)
    assert sum(isinstance(m, Disout) for m in model.modules()) == 12


def test_plain_resnet_does_not_import_timm():
    """timm (seconds to import) is imported only when drop path or DropBlock is switched on."""
    code = "import sys; from src.models.resnet_cifar import resnet_cifar; resnet_cifar(20); print('timm' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- timm nets -----------------------------------------------------------------------------------


def test_timm_nets_take_drop_path_and_dropblock_rates():
    from timm.layers import DropBlock2d, DropPath

    from src.models.timm_net import create_timm_net

    def count(model: nn.Module, kind: type) -> int:
        return sum(isinstance(m, kind) for m in model.modules())

    assert count(create_timm_net("resnet18", num_classes=10), DropPath) == 0
    assert count(create_timm_net("resnet18", num_classes=10, drop_path_rate=0.1), DropPath) > 0
    assert count(create_timm_net("resnet18", num_classes=10, drop_block_rate=0.1), DropBlock2d) > 0
