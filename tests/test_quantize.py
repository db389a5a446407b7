"""INT8 post-training static quantisation: onnxruntime (QDQ) and torch.ao (FX, x86)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from src.deploy.latency import deterministic_algorithms_off, ort_run, ort_session
from src.deploy.onnx_export import export_onnx
from src.deploy.quantize import quantize_onnx_static, quantize_torch_fx
from src.models.resnet_cifar import resnet_cifar
from src.utils.errors import AutoclsError


@pytest.fixture(scope="module")
def net_and_images():
    """A ResNet-20 whose BatchNorm statistics fit the images (as after training), and images drawn
    like the calibration set: INT8 ranges are only meaningful for inputs from that distribution."""
    torch.manual_seed(0)
    net = resnet_cifar(depth=20, num_classes=10, in_chans=3)
    images = torch.randn(96, 3, 16, 16)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(images)  # BN running statistics of these images
    return net.eval(), images[:64], images[64:]


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def test_onnxruntime_static_int8_is_quantised_and_close(net_and_images, tmp_path):
    net, calibration, held_out = net_and_images
    fp32 = export_onnx(net, (3, 16, 16), tmp_path / "m.onnx")
    int8 = quantize_onnx_static(fp32, tmp_path / "m.int8.onnx", calibration)
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    got, expected = ort_run(ort_session(int8), held_out), ort_run(ort_session(fp32), held_out)
    assert _relative_error(got, expected) < 0.1
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.8


def test_torch_fx_int8_is_quantised_and_close(net_and_images):
    net, calibration, held_out = net_and_images
    quantized = quantize_torch_fx(net, calibration)
    kinds = {type(m).__module__ for m in quantized.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") for k in kinds)
    # as deployed: without the deterministic mode an earlier training run in this process may have left on
    with torch.inference_mode(), deterministic_algorithms_off():
        got, expected = quantized(held_out).numpy(), net(held_out).numpy()
    assert _relative_error(got, expected) < 0.1


def test_quantisation_bad_inputs_are_one_sentence(net_and_images, tmp_path):
    net, calibration, _ = net_and_images
    with pytest.raises(AutoclsError, match="does not exist; export the fp32 model first"):
        quantize_onnx_static(tmp_path / "missing.onnx", tmp_path / "out.onnx", calibration)
    with pytest.raises(AutoclsError, match="Calibration needs a non-empty batch of images"):
        quantize_torch_fx(net, torch.empty(0, 3, 16, 16))


def _script(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deploy_table_reports_int8_accuracy_and_training_length(compose_train, tmp_path, capsys):
    """scripts/deploy_table.py on a digits checkpoint (only its own rows): latency ratios, fp32 and
    INT8 top-1 on the test split, and how long the model was trained."""
    from src.train import train

    fit = train(compose_train(["trainer.max_epochs=2", "logger=none"]))
    capsys.readouterr()  # the training run's own printout
    _script("deploy_table").main(["--ckpt", fit["best_ckpt"], "--skip-models", "--threads", "1",
                                  "--repeats", "3", "--warmup", "1", "--out", str(tmp_path / "table.md")])
    out = capsys.readouterr().out
    assert "| checkpoint (trained, see below) | 1 |" in out
    assert "trained for 2 epochs (38 optimizer steps, batch 64) on 1258 training images" in out
    row = next(line for line in out.splitlines() if line.startswith("| test | 270 |"))
    eager, fp32, int8, drop = (cell.strip() for cell in row.split("|")[3:7])
    assert eager == fp32 and eager == f"{100 * fit['test/acc']:.2f}%"
    assert float(drop) == pytest.approx(float(fp32[:-1]) - float(int8[:-1]), abs=0.01)
    assert abs(float(drop)) <= 3.0  # a few of 270 images at most
    assert (tmp_path / "table.md").read_text().strip() == out.strip()
