"""Latency measurement, FLOP counting, latency targets and the latency-export callback."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from src.deploy import backends
from src.deploy.backends import DeployVariants, LatencyTarget, targets_from_config
from src.deploy.benchmark import benchmark_targets, run_benchmark
from src.deploy.latency import (
    count_params_flops,
    measure_latency,
    measure_onnx_latency,
    ort_session,
    time_calls,
)
from src.deploy.onnx_export import export_onnx
from src.models.small_cnn import SmallCNN
from src.train import train
from src.utils.errors import AutoclsError


def test_time_calls_measures_each_call_after_warmup():
    calls = []

    def sleep_2ms():
        calls.append(time.perf_counter())
        time.sleep(0.002)

    times = time_calls(sleep_2ms, warmup=3, repeats=7)
    assert len(calls) == 10 and len(times) == 7
    # sleep() never returns early; the scheduler may add a little, never 10x
    assert all(2.0 <= t < 20.0 for t in times)


def test_measure_latency_reports_order_statistics_and_restores_threads():
    seen = []

    def model(x):
        seen.append(torch.get_num_threads())
        return x * 2

    before = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        result = measure_latency(model, torch.zeros(3, 4), threads=1, warmup=2, repeats=11)
        assert torch.are_deterministic_algorithms_enabled()  # restored after timing without it
    finally:
        torch.use_deterministic_algorithms(False)
    assert set(seen) == {1} and torch.get_num_threads() == before
    assert result.repeats == 11 and result.batch_size == 3 and result.threads == 1
    assert 0 < result.min_ms <= result.median_ms <= result.p90_ms
    assert (result.device, result.backend) == ("cpu", "torch")
    assert set(result.as_dict()) >= {"median_ms", "p90_ms", "mean_ms", "repeats", "threads", "device", "backend"}


def test_measure_latency_leaves_the_callers_module_untouched():
    net = SmallCNN(num_classes=3, in_chans=1, width=4).train()
    result = measure_latency(net, torch.randn(1, 1, 8, 8), warmup=1, repeats=3, dtype=torch.float64)
    assert result.backend == "torch-torch.float64"
    assert next(net.parameters()).dtype == torch.float32


def test_count_params_flops_matches_closed_form():
    """conv 3->8 (3x3, pad 1) on 8x8 + linear 8->5 after global pooling; FlopCounterMode counts 2 per MAC."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    params, flops = count_params_flops(net, torch.randn(1, 3, 8, 8))
    assert params == (8 * 3 * 9 + 8) + (8 * 5 + 5)
    assert flops == 2 * (8 * 8 * 8 * 3 * 9) + 2 * (8 * 5)
    _, flops4 = count_params_flops(net, torch.randn(4, 3, 8, 8))
    assert flops4 == 4 * flops


def test_onnx_latency_uses_the_requested_threads(tmp_path):
    net = SmallCNN(num_classes=3, in_chans=1, width=4)
    path = export_onnx(net, (1, 8, 8), tmp_path / "m.onnx")
    assert ort_session(path, threads=1).get_session_options().intra_op_num_threads == 1
    result = measure_onnx_latency(path, torch.randn(5, 1, 8, 8), threads=1, warmup=1, repeats=4)
    assert (result.backend, result.threads, result.batch_size, result.repeats) == ("onnxruntime", 1, 5, 4)


def test_onnx_session_config_entries_reach_the_session(tmp_path):
    """Thread-pool settings for the latency tables (`scripts/deploy_table.py --ort-config`): set on the
    session as given; an entry onnxruntime refuses is one sentence."""
    net = SmallCNN(num_classes=3, in_chans=1, width=4)
    path = export_onnx(net, (1, 8, 8), tmp_path / "m.onnx")
    config = {"session.intra_op.allow_spinning": "0", "session.dynamic_block_base": "4"}
    options = ort_session(path, threads=2, session_config=config).get_session_options()
    assert {key: options.get_session_config_entry(key) for key in config} == config
    result = measure_onnx_latency(path, torch.randn(1, 1, 8, 8), threads=2, warmup=1, repeats=3, session_config=config)
    assert result.repeats == 3 and result.median_ms > 0
    with pytest.raises(AutoclsError, match="onnxruntime refuses the session config entry =4"):
        ort_session(path, session_config={"": "4"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"backend": "tflite"}, "Unknown backend 'tflite'; use one of torch, inductor, onnxruntime, tensorrt."),
        ({"precision": "int4"}, "Unknown precision 'int4'"),
        ({"backend": "onnxruntime", "precision": "int8", "device": "cuda"}, "onnxruntime runs int8 only on cpu"),
        ({"backend": "tensorrt", "device": "cpu"}, "tensorrt runs fp32 only on cuda"),
        ({"threads": 0}, "must be positive"),
    ],
)
def test_bad_latency_targets_are_one_sentence(fields, message):
    with pytest.raises(AutoclsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LatencyTarget(**fields)


def test_target_names_and_unavailable_cuda():
    target = targets_from_config([{"backend": "onnxruntime", "precision": "int8", "threads": 2, "batch_size": 8}])[0]
    assert target.name == "onnxruntime-int8_cpu_t2_b8"
    cuda = LatencyTarget(backend="torch", precision="fp16", device="cuda")
    if not torch.cuda.is_available():
        assert cuda.unavailable_reason() == "no CUDA device"
        with pytest.raises(AutoclsError, match="Cannot measure torch-fp16_cuda_b1 here"):
            DeployVariants(SmallCNN(3, 1, 4), (1, 8, 8), "unused").measure(cuda)


def test_inductor_targets_say_what_they_need(monkeypatch):
    monkeypatch.setattr(backends, "_cpp_compiler", lambda: None)
    assert "no C++ compiler" in LatencyTarget(backend="inductor").unavailable_reason()
    monkeypatch.setattr(backends, "_cpp_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    assert LatencyTarget(backend="inductor").unavailable_reason() is None
    assert "torchao is not installed" in LatencyTarget(backend="inductor", precision="int8").unavailable_reason()


class _DataDependentNet(nn.Module):
    """Branches on a tensor's value: torch.fx cannot trace it, so torch.ao's FX INT8 cannot be built."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_benchmark_skips_a_form_it_cannot_build_and_measures_the_rest(tmp_path):
    variants = DeployVariants(_DataDependentNet(), (1, 8, 8), tmp_path, calibration=torch.randn(4, 1, 8, 8))
    targets = benchmark_targets(["torch", "torch-int8"], threads=[1], batch_sizes=[1])
    rows, notes = run_benchmark(variants, targets, warmup=1, repeats=2)
    assert [label for label, _ in rows] == ["torch"]
    assert len(notes) == 1 and notes[0].startswith("torch-int8 on cpu: skipped (torch.fx cannot trace _DataDependentNet")


def test_a_network_torch_compile_cannot_build_is_one_sentence(monkeypatch):
    def failing_compile(module):
        def run(images):
            raise RuntimeError("InductorError: UnsupportedOperatorException: onednn.qconv_prepack.default\n<pages of trace>")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    run = backends.frozen_compile(SmallCNN(3, 1, 4))
    with pytest.raises(AutoclsError, match=r"torch.compile could not build SmallCNN \(InductorError: Unsupported"):
        run(torch.randn(1, 1, 8, 8))


def test_int8_target_without_calibration_images_is_one_sentence(tmp_path):
    variants = DeployVariants(SmallCNN(3, 1, 4), (1, 8, 8), tmp_path)
    with pytest.raises(AutoclsError, match="INT8 needs calibration images"):
        variants.measure(LatencyTarget(precision="int8"), warmup=1, repeats=1)


def test_latency_export_callback_writes_files_and_reports_metrics(compose_train, tmp_path):
    """callbacks=latency_export on the default digits run: export/model.onnx + model.json + latency.json,
    deploy/* metrics returned by train() (what a sweep optimises) and logged to the CSV logger."""
    cfg = compose_train([
        "callbacks=latency_export", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
        "callbacks.latency_export.repeats=5", "callbacks.latency_export.warmup=1",
        (
            "callbacks.latency_export.targets=[{backend:onnxruntime,threads:1},{backend:torch,threads:1,batch_size:4},"
            "{backend:torch,precision:fp16,device:cuda}]"
        ),
    ])
    assert "model_checkpoint" in cfg.callbacks  # the option adds to the default callbacks
    metrics = train(cfg)
    export = tmp_path / "export"
    sidecar = json.loads((export / "model.json").read_text())
    assert sidecar["class_names"] == [str(i) for i in range(10)]
    assert (sidecar["image_size"], sidecar["in_chans"], sidecar["mean"], sidecar["std"]) == (8, 1, [0.3059], [0.3761])
    assert sidecar["export"]["checkpoint"] == metrics["best_ckpt"]
    assert sidecar["export"]["max_abs_diff"] <= 1e-4
    report = json.loads((export / "latency.json").read_text())
    assert "cores" in report["machine"]
    assert [r["name"] for r in report["results"]] == ["onnxruntime_cpu_t1_b1", "torch_cpu_t1_b4"]
    assert metrics["deploy/latency_ms"] == pytest.approx(report["results"][0]["median_ms"])
    assert metrics["deploy/latency_ms/torch_cpu_t1_b4"] == pytest.approx(report["results"][1]["median_ms"])
    assert metrics["deploy/params_m"] == pytest.approx(sum(p.numel() for p in SmallCNN(10, 1).parameters()) / 1e6)
    assert metrics["deploy/mflops"] == pytest.approx(report["flops"] / 1e6) and report["flops"] > 0
    if not torch.cuda.is_available():
        assert report["skipped"][0]["reason"] == "no CUDA device"
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"deploy/latency_ms", "deploy/params_m", "deploy/mflops"} <= set(header)


def test_latency_export_rejects_unknown_backend_before_training(compose_train):
    cfg = compose_train(["callbacks=latency_export", "callbacks.latency_export.targets=[{backend:coreml}]"])
    with pytest.raises(Exception) as info:
        train(cfg)
    from src.utils.errors import find_user_error

    assert "Unknown backend 'coreml'" in str(find_user_error(info.value))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_table_and_unknown_backend(capsys):
    main = _script("benchmark_latency").main
    main(["--net", "small_cnn", "width=4", "--image-size", "8", "--backends", "torch", "onnxruntime-int8",
          "torch-fp16@cuda", "--threads", "1", "--batch-sizes", "1", "4", "--repeats", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "Machine: " in out and "cores" in out
    rows = [line for line in out.splitlines() if line.startswith(("| torch |", "| onnxruntime-int8 |"))]
    assert len(rows) == 4 and all("| 1.00x |" in r for r in rows if r.startswith("| torch |"))
    if not torch.cuda.is_available():
        assert "- torch-fp16 on cuda: skipped (no CUDA device)" in out
    with pytest.raises(SystemExit) as info:
        main(["--net", "small_cnn", "--backends", "tflite"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "Error: Unknown backend 'tflite'; use one of torch, inductor, onnxruntime, tensorrt."


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_and_fp16_latency_with_cuda_events():
    net = SmallCNN(num_classes=10, in_chans=3, width=16)
    fp32 = measure_latency(net, torch.randn(8, 3, 32, 32), device="cuda", warmup=3, repeats=10)
    fp16 = measure_latency(net, torch.randn(8, 3, 32, 32), device="cuda", dtype=torch.float16, warmup=3, repeats=10)
    assert (fp32.device, fp32.backend, fp16.backend) == ("cuda", "torch", "torch-fp16")
    assert fp32.threads is None and 0 < fp32.median_ms <= fp32.p90_ms
    assert next(net.parameters()).device.type == "cpu"  # measured on a copy
