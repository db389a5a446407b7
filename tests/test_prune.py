"""Structured channel pruning (torch-pruning) and the prune + fine-tune compression step."""

from __future__ import annotations

import pytest
import torch

from src.deploy.onnx_export import export_onnx, onnx_max_abs_diff
from src.deploy.prune import prune_channels
from src.models.resnet_cifar import resnet_cifar
from src.models.small_cnn import SmallCNN
from src.utils.errors import AutoclsError


def _params(net):
    return sum(p.numel() for p in net.parameters())


def test_half_the_channels_of_small_cnn_closed_form():
    """SmallCNN(width=8): convs 3->8->16->32, fc 32->10. Ratio 0.5 leaves 3->4->8->16 and fc 16->10."""
    net = SmallCNN(num_classes=10, in_chans=3, width=8)
    pruned = prune_channels(net, torch.randn(2, 3, 16, 16), 0.5)
    expected = (3 * 4 * 9 + 2 * 4) + (4 * 8 * 9 + 2 * 8) + (8 * 16 * 9 + 2 * 16) + (16 * 10 + 10)
    assert _params(pruned) == expected
    assert pruned.fc.out_features == 10 and pruned.num_features == 16  # classifier outputs kept, contract updated
    assert pruned(torch.randn(3, 3, 16, 16)).shape == (3, 10)
    assert _params(net) == _params(SmallCNN(num_classes=10, in_chans=3, width=8))  # the argument is untouched


def test_per_stage_ratios_prune_only_the_named_stage():
    net = resnet_cifar(depth=18, num_classes=10, in_chans=3)
    pruned = prune_channels(net, torch.randn(2, 3, 32, 32), {"stages.3": 0.5})
    widths = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)}
    # a block's inner conv may shrink; the residual stream is pruned together with its projection
    assert widths["stages.3.0.conv1"] == 256 and widths["stages.3.1.conv1"] == 256
    assert widths["stages.2.1.conv1"] == 256 and widths["stem.0"] == 64  # other stages untouched
    assert pruned.fc.out_features == 10


def test_option_a_resnet_keeps_its_zero_padded_residual_stream_and_exports(tmp_path):
    net = resnet_cifar(depth=20, num_classes=10, in_chans=3).eval()
    pruned = prune_channels(net, torch.randn(2, 3, 32, 32), 0.5)
    convs = dict(pruned.named_modules())
    assert convs["stages.0.0.conv1"].out_channels == 8 and convs["stages.0.0.conv2"].out_channels == 16
    assert _params(pruned) < 0.6 * _params(net)
    path = export_onnx(pruned, (3, 32, 32), tmp_path / "pruned.onnx")
    assert onnx_max_abs_diff(pruned, path, torch.randn(2, 3, 32, 32)) <= 1e-4


def test_timm_mobilenet_prunes_and_keeps_the_classifier():
    from src.models.timm_net import create_timm_net

    net = create_timm_net("mobilenetv3_small_050", num_classes=10)
    pruned = prune_channels(net, torch.randn(2, 3, 32, 32), 0.3)
    assert pruned.get_classifier().out_features == 10
    assert pruned.forward_features(torch.randn(1, 3, 32, 32)).shape[1] == pruned.num_features
    assert pruned.get_classifier().in_features == pruned.head_hidden_size
    assert _params(pruned) < _params(net)


def test_bad_pruning_arguments_are_one_sentence():
    net, example = SmallCNN(num_classes=10, in_chans=3, width=8), torch.randn(1, 3, 8, 8)
    with pytest.raises(AutoclsError, match="Pruning ratio 1.0 is outside"):
        prune_channels(net, example, 1.0)
    with pytest.raises(AutoclsError, match="has no module 'layer9'; use a prefix such as one of: features"):
        prune_channels(net, example, {"layer9": 0.3})


def test_fine_tune_trains_the_given_network_with_the_run_recipe(compose_train):
    """Two optimizer steps of the run's recipe: weights and BatchNorm statistics move (train mode),
    the pruned widths stay."""
    from src.deploy.compress import fine_tune, training_datamodule
    from src.utils.instantiate import config_to_dict

    config = config_to_dict(compose_train(["logger=none"]))
    net = prune_channels(SmallCNN(num_classes=10, in_chans=1, width=8).eval(), torch.randn(2, 1, 8, 8), 0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tuned = fine_tune(net, config, training_datamodule(config), epochs=1, max_steps=2)
    after = tuned.state_dict()
    assert not tuned.training and after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape for k in before)
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert not torch.equal(after["features.0.1.running_mean"], before["features.0.1.running_mean"])
    assert int(after["features.0.1.num_batches_tracked"]) == 2


@pytest.mark.slow
def test_compress_recovers_accuracy_with_a_short_fine_tune(compose_train, tmp_path):
    """Digits SmallCNN: pruning 70% of the channels costs accuracy; one fine-tune epoch with the run's
    own recipe wins most of it back; parameters, FLOPs and latency are reported before and after."""
    from src.deploy.backends import LatencyTarget
    from src.deploy.compress import compress, training_datamodule
    from src.deploy.trained_net import load_trained_net
    from src.train import train

    fit = train(compose_train(["trainer.max_epochs=2", "logger=none"], out=tmp_path / "fit"))
    trained = load_trained_net(fit["best_ckpt"])
    _, row = compress(trained.net, trained.config, training_datamodule(trained.config), 0.7, epochs=1,
                      target=LatencyTarget(backend="torch", threads=1), workdir=tmp_path / "compress",
                      warmup=1, repeats=5)
    assert row["params_m"] < 0.2 * row["params_m_before"] and row["mflops"] < 0.2 * row["mflops_before"]
    assert row["top1_before"] == pytest.approx(fit["test/acc"], abs=1e-6)
    assert row["top1"] > row["top1_pruned"] + 0.05, row
    assert row["latency_ms"] > 0 and row["latency_ms_before"] > 0
