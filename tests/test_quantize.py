"""INT8 post-training static quantisation: onnxruntime (QDQ, with the integer rewrites of
src/deploy/qdq_rewrites.py, and the choice of activation ranges), torch.ao (FX, x86) and torchao (PT2E)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from src.deploy import quantize
from src.deploy.backends import LatencyTarget, frozen_compile
from src.deploy.latency import deterministic_algorithms_off, ort_run, ort_session
from src.deploy.onnx_export import export_onnx
from src.deploy.qdq_rewrites import (
    clip_hard_sigmoid_inputs,
    global_average_pools,
    integer_hard_sigmoids,
)
from src.deploy.quantize import (
    int8_metadata,
    quantize_onnx_static,
    quantize_torch_fx,
    quantize_torchao_pt2e,
)
from src.models.resnet_cifar import resnet_cifar
from src.models.small_cnn import SmallCNN
from src.models.timm_net import create_timm_net
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


def _quadrant_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class (0-3) is the quadrant that is brighter: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (count,), generator=generator)
    images = 0.5 * torch.randn(count, 3, 16, 16, generator=generator)
    for image, label in zip(images, labels.tolist(), strict=True):
        row, col = divmod(label, 2)
        image[:, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] += 1.0
    return images, labels


@pytest.fixture(scope="module")
def trained_quadrant_net():
    """A SmallCNN trained to 100% on `_quadrant_images`: its logits have a trained network's margins, so
    top-1 agreement between fp32 and INT8 measures the quantisation error and not the noise of ties."""
    torch.manual_seed(0)
    net = SmallCNN(num_classes=4, in_chans=3, width=8, dropout=0.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    images, labels = _quadrant_images(512, seed=0)
    for _ in range(60):
        batch = torch.randint(0, len(images), (64,))
        loss = torch.nn.functional.cross_entropy(net(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out, held_out_labels = _quadrant_images(256, seed=2)
    with torch.no_grad():
        assert (net.eval()(held_out).argmax(1) == held_out_labels).float().mean() > 0.95
    return net, _quadrant_images(64, seed=1)[0], held_out


def test_auto_calibration_clips_an_outlier_that_min_max_ranges_stretch_over(trained_quadrant_net, tmp_path):
    net, calibration, held_out = trained_quadrant_net
    spiked = calibration.clone()
    spiked[0, :, 5:7, 5:7] = 300.0  # four hot pixels in one image: 0.1% of the values, all of min-max's range
    fp32 = export_onnx(net, (3, 16, 16), tmp_path / "m.onnx")
    expected = ort_run(ort_session(fp32), held_out)
    errors, agreements = {}, {}
    for method in ("minmax", "auto"):
        got = ort_run(ort_session(quantize_onnx_static(fp32, tmp_path / f"{method}.onnx", spiked,
                                                       calibration_method=method)), held_out)
        errors[method] = _relative_error(got, expected)
        agreements[method] = (got.argmax(1) == expected.argmax(1)).mean()
    recorded = int8_metadata(tmp_path / "auto.onnx")  # the choice of auto, kept in the file
    assert recorded["int8_calibration"].startswith("percentile-") and float(recorded["int8_top1_agreement"]) > 0.95
    assert agreements["minmax"] < 0.9 and agreements["auto"] > 0.95
    assert errors["auto"] < 0.5 * errors["minmax"]


def test_auto_calibration_keeps_the_graph_that_agrees_best_with_fp32(net_and_images, tmp_path, monkeypatch):
    net, calibration, _ = net_and_images
    fp32 = export_onnx(net, (3, 16, 16), tmp_path / "m.onnx")
    scores = {"minmax": (0.90, 0.05), "percentile-99.99": (0.95, 0.20), "percentile-99.9": (0.95, 0.10)}
    monkeypatch.setattr(quantize, "_fidelity", lambda reference, candidate, images: scores[Path(candidate).stem])
    chosen = int8_metadata(quantize_onnx_static(fp32, tmp_path / "auto.onnx", calibration))
    assert chosen == {"int8_calibration": "percentile-99.9", "int8_top1_agreement": "0.950000",
                      "int8_logit_error": "0.100000"}  # most agreement; on a tie, the smaller logit error
    with pytest.raises(AutoclsError, match="Unknown calibration method 'kl'; use auto or one of minmax"):
        quantize_onnx_static(fp32, tmp_path / "x.onnx", calibration, calibration_method="kl")


def _fit_batchnorm(net: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """BatchNorm running statistics of `images` (as after training), so activations and their INT8
    ranges look like a trained network's rather than a random one's."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(images)
    return net.eval()


@pytest.fixture(scope="module")
def mobilenet_onnx(tmp_path_factory):
    """timm's MobileNetV3-Small 0.5 (squeeze-excitation gates, hard-swish, depthwise convolutions) at
    32 px, exported to ONNX, with calibration and held-out images."""
    torch.manual_seed(0)
    images = torch.randn(96, 3, 32, 32)
    net = _fit_batchnorm(create_timm_net("mobilenetv3_small_050", num_classes=10), images)
    path = export_onnx(net, (3, 32, 32), tmp_path_factory.mktemp("mobilenet") / "m.onnx")
    return path, images[:64], images[64:]


def _optimised_op_counts(path, tmp_path) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs (after its QDQ fusion into integer kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(options.optimized_model_filepath).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_mobilenet_int8_runs_in_integer_kernels_from_input_to_logits(mobilenet_onnx, tmp_path):
    """The recipe pinned: every convolution (depthwise included), the SE pools and gates and the
    hard-swishes run as onnxruntime integer kernels; the only float work left is quantising the
    input and dequantising the logits. Without the rewrites the pools and HardSigmoids stay in float."""
    fp32, calibration, _ = mobilenet_onnx
    convs = sum(node.op_type == "Conv" for node in onnx.load(str(fp32)).graph.node)
    int8 = quantize_onnx_static(fp32, tmp_path / "m.int8.onnx", calibration)
    saved = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert "ReduceMean" not in saved and "HardSigmoid" not in saved and "GlobalAveragePool" in saved
    ops = _optimised_op_counts(int8, tmp_path)
    assert ops.get("QLinearConv") == convs and "Conv" not in ops
    assert ops.get("QLinearGlobalAveragePool", 0) >= 1 and ops.get("QLinearMul", 0) >= 1
    assert ops.get("QuantizeLinear") == 1 and ops.get("DequantizeLinear") == 1
    assert not {"HardSigmoid", "ReduceMean", "Mul", "Add"} & set(ops)

    # the hard-swish inputs were calibrated from -3 (clip_hard_sigmoid_inputs), not from their minimum
    model = onnx.load(str(int8))
    values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    scaled = [n for n in model.graph.node if n.name.endswith("_hard_sigmoid_alpha_x")]
    assert scaled
    for node in scaled:
        step = float(values[node.input[1]]) * 6  # the input's own scale (alpha = 1/6)
        assert -int(values[node.input[2]]) * step >= -3 - step

    plain = quantize_onnx_static(fp32, tmp_path / "plain.int8.onnx", calibration, integer_rewrites=False)
    plain_ops = _optimised_op_counts(plain, tmp_path)
    assert plain_ops.get("HardSigmoid", 0) >= 1 and plain_ops.get("ReduceMean", 0) >= 1
    assert plain_ops.get("QuantizeLinear") > 1


def test_integer_rewrites_keep_int8_as_close_to_fp32(mobilenet_onnx, tmp_path):
    """With the rewrites (exact in float; the clip only narrows calibrated ranges) INT8 stays at least
    as close to fp32 on held-out images as onnxruntime's quantiser alone, and agrees on the top-1."""
    fp32, calibration, held_out = mobilenet_onnx
    rewritten = quantize_onnx_static(fp32, tmp_path / "a.onnx", calibration)
    plain = quantize_onnx_static(fp32, tmp_path / "b.onnx", calibration, integer_rewrites=False)
    expected = ort_run(ort_session(fp32), held_out)
    got, before = ort_run(ort_session(rewritten), held_out), ort_run(ort_session(plain), held_out)
    assert _relative_error(got, expected) <= 1.05 * _relative_error(before, expected)
    assert _relative_error(got, expected) < 0.2
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.75


def test_hard_swish_after_a_long_negative_tail_keeps_its_resolution(tmp_path):
    """A convolution output whose one channel sits far below -3 (-120 to -40) and feeds a hard-swish
    (non-zero above -3 only), like the head of a MobileNetV3 trained on CIFAR: calibrated from its
    minimum, the tensor's uint8 step (0.47) is coarser than hard-swish's whole negative lobe; clipped
    at -3 first, INT8 is several times closer to fp32."""
    conv = torch.nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.diag(torch.tensor([1.0, 1.0, 20.0])).view(3, 3, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, 0.0, -60.0]))
    net = torch.nn.Sequential(conv, torch.nn.Hardswish()).eval()
    fp32 = export_onnx(net, (3, 8, 8), tmp_path / "hswish.onnx")
    images = 4 * torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 3  # [-3, 1]
    expected = ort_run(ort_session(fp32), images[32:])
    errors = {}
    for rewrites in (True, False):
        int8 = quantize_onnx_static(fp32, tmp_path / f"{rewrites}.onnx", images[:32], integer_rewrites=rewrites)
        errors[rewrites] = _relative_error(ort_run(ort_session(int8), images[32:]), expected)
    assert errors[True] < 0.05 < errors[False] and errors[True] < errors[False] / 3


def _graph(nodes, initializers, inputs, outputs) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [onnx.numpy_helper.from_array(v, k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_only_spatial_means_that_keep_dims_become_global_pools():
    from onnx import helper

    axes = {"hw": np.array([2, 3], np.int64), "neg": np.array([-1, -2], np.int64), "ch": np.array([1], np.int64)}
    model = _graph(
        [helper.make_node("ReduceMean", ["x", "hw"], ["a"], keepdims=1),
         helper.make_node("ReduceMean", ["x", "neg"], ["b"], keepdims=1),
         helper.make_node("ReduceMean", ["x", "hw"], ["c"], keepdims=0),   # drops H, W: not a pool
         helper.make_node("ReduceMean", ["x", "ch"], ["d"], keepdims=1)],   # over channels
        axes, [("x", [1, 4, 5, 5])], [("a", [1, 4, 1, 1]), ("b", [1, 4, 1, 1]), ("c", [1, 4]), ("d", [1, 1, 5, 5])])
    model = onnx.shape_inference.infer_shapes(model)
    assert global_average_pools(model) == 2
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool"] * 2 + ["ReduceMean"] * 2
    assert sorted(i.name for i in model.graph.initializer) == ["ch", "hw"]  # "neg" was only the rewritten mean's

    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)
    a, b, c, d = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(a, x.mean((2, 3), keepdims=True), atol=1e-6)
    np.testing.assert_allclose(b, a, atol=0)
    np.testing.assert_allclose(c, x.mean((2, 3)), atol=1e-6)
    np.testing.assert_allclose(d, x.mean(1, keepdims=True), atol=1e-6)


def test_hard_sigmoid_inputs_are_clipped_where_their_value_no_longer_matters():
    """A tensor that only feeds a hard-swish is clipped below at -3, one that only feeds a HardSigmoid
    (an SE gate) at [-3, 3]; one with any other reader is left alone; the float result is unchanged."""
    from onnx import helper

    nodes = [helper.make_node("HardSigmoid", ["a"], ["ga"], alpha=1 / 6, beta=0.5),   # a: hard-swish
             helper.make_node("Mul", ["a", "ga"], ["swish"]),
             helper.make_node("HardSigmoid", ["b"], ["gate"], alpha=1 / 6, beta=0.5),  # b: SE gate
             helper.make_node("HardSigmoid", ["c"], ["gc"], alpha=1 / 6, beta=0.5),   # c: also read by Add
             helper.make_node("Mul", ["c", "gc"], ["swish_c"]),
             helper.make_node("Add", ["c", "swish_c"], ["sum_c"])]
    shape = [1, 3, 4, 4]
    model = _graph(nodes, {}, [("a", shape), ("b", shape), ("c", shape)],
                   [("swish", shape), ("gate", shape), ("sum_c", shape)])
    original = model.SerializeToString()
    assert clip_hard_sigmoid_inputs(model) == 2
    clips = {n.input[0]: [float(onnx.numpy_helper.to_array(i)) for i in model.graph.initializer if i.name in n.input]
             for n in model.graph.node if n.op_type == "Clip"}
    assert clips == {"a": [-3.0], "b": [-3.0, 3.0]}

    import onnxruntime as ort

    feeds = {k: 10 * np.random.default_rng(0).standard_normal(shape).astype(np.float32) for k in "abc"}
    run = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feeds)
           for m in (original, model.SerializeToString())]
    for before, after in zip(*run, strict=True):
        np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize(("out_zero_point", "out_scale", "rewritten"),
                         [(0, 1 / 255, True), (0, 0.5 / 255, True), (10, 1 / 255, False), (0, 2 / 255, False)])
def test_hard_sigmoid_becomes_an_add_only_where_saturation_is_its_clip(out_zero_point, out_scale, rewritten):
    """DQ -> HardSigmoid -> Q is rewritten when the output's uint8 range is [0, <= 1] (saturation
    then clips like HardSigmoid), and gives the same uint8 values; otherwise it is left alone."""
    from onnx import TensorProto, helper

    inits = {"s": np.array(0.05, np.float32), "z": np.array(128, np.uint8),
             "sh": np.array(out_scale, np.float32), "zh": np.array(out_zero_point, np.uint8)}
    nodes = [helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
             helper.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5),
             helper.make_node("QuantizeLinear", ["h", "sh", "zh"], ["hq"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [256])],
                              [helper.make_tensor_value_info("hq", TensorProto.UINT8, [256])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    original = model.SerializeToString()
    assert integer_hard_sigmoids(model) == int(rewritten)
    assert ("HardSigmoid" in {n.op_type for n in model.graph.node}) != rewritten

    import onnxruntime as ort

    def run(serialised: bytes) -> np.ndarray:
        session = ort.InferenceSession(serialised, providers=["CPUExecutionProvider"])
        return session.run(None, {"xq": np.arange(256, dtype=np.uint8)})[0]

    got, before = run(model.SerializeToString()).astype(int), run(original).astype(int)
    # both are a correct rounding of the exact HardSigmoid; they may differ only at exact .5 ties
    x = 0.05 * (np.arange(256) - 128.0)
    exact = np.clip(x / 6 + 0.5, 0, 1) / out_scale + out_zero_point
    assert np.all(np.abs(got - np.clip(exact, 0, 255)) <= 0.5 + 1e-6)
    ties = np.isclose(exact % 1, 0.5)
    np.testing.assert_array_equal(got[~ties], before[~ties])


def test_torch_fx_int8_is_quantised_and_close(net_and_images):
    net, calibration, held_out = net_and_images
    quantized = quantize_torch_fx(net, calibration)
    kinds = {type(m).__module__ for m in quantized.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") for k in kinds)
    # as deployed: without the deterministic mode an earlier training run in this process may have left on
    with torch.inference_mode(), deterministic_algorithms_off():
        got, expected = quantized(held_out).numpy(), net(held_out).numpy()
    assert _relative_error(got, expected) < 0.1


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
@pytest.mark.skipif(LatencyTarget(backend="inductor").unavailable_reason() is not None, reason="needs a C++ compiler")
def test_torchao_pt2e_int8_compiles_to_integer_kernels_and_stays_close(net_and_images):
    net, calibration, held_out = net_and_images
    quantized = quantize_torchao_pt2e(net, calibration)
    ops = {str(node.target) for node in quantized.graph.nodes if node.op == "call_function"}
    assert any("quantize_per_tensor" in op for op in ops) and any("dequantize_per_channel" in op for op in ops)
    compiled = frozen_compile(quantized)
    with torch.inference_mode(), deterministic_algorithms_off():
        # two batch sizes: the graph's batch dimension stayed dynamic through export and calibration
        got = np.concatenate([compiled(held_out[:1]).numpy(), compiled(held_out[1:]).numpy()])
        expected = net(held_out).numpy()
    assert got.shape == expected.shape == (32, 10)
    assert _relative_error(got, expected) < 0.1


def test_quantisation_bad_inputs_are_one_sentence(net_and_images, tmp_path):
    net, calibration, _ = net_and_images
    with pytest.raises(AutoclsError, match="does not exist; export the fp32 model first"):
        quantize_onnx_static(tmp_path / "missing.onnx", tmp_path / "out.onnx", calibration)
    with pytest.raises(AutoclsError, match="Calibration needs a non-empty batch of images"):
        quantize_torch_fx(net, torch.empty(0, 3, 16, 16))
    with pytest.raises(AutoclsError, match="Calibration needs a non-empty batch of images"):
        quantize_torchao_pt2e(net, torch.empty(0, 3, 16, 16))


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
    assert f"| trained {Path(fit['best_ckpt']).parent.parent.name} (see below) | 1 |" in out
    assert "trained for 2 epochs (38 optimizer steps, batch 64) on 1258 training images" in out
    row = next(line for line in out.splitlines() if line.startswith("| test | 270 |"))
    eager, fp32, int8, drop = (cell.strip() for cell in row.split("|")[3:7])
    assert eager == fp32 and eager == f"{100 * fit['test/acc']:.2f}%"
    assert float(drop) == pytest.approx(float(fp32[:-1]) - float(int8[:-1]), abs=0.01)
    assert abs(float(drop)) <= 3.0  # a few of 270 images at most
    assert (tmp_path / "table.md").read_text().strip() == out.strip()
    with pytest.raises(AutoclsError, match="--ort-config takes KEY=VALUE pairs"):
        _script("deploy_table").make_table(argparse.Namespace(ort_config=["session.dynamic_block_base"]))
