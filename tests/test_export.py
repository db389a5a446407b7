"""ONNX export of every network family (checked by onnxruntime), TorchScript round trips, and
`scripts/export.py` with its bad-input messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src.deploy.exporter import export_checkpoint
from src.deploy.latency import ort_run, ort_session
from src.deploy.onnx_export import (
    export_onnx,
    export_torchscript,
    load_torchscript,
    onnx_max_abs_diff,
)
from src.deploy.sidecar import read_sidecar
from src.train import train
from src.utils.errors import AutoclsError

ROOT = Path(__file__).resolve().parents[1]


def _small_cnn():
    from src.models.small_cnn import SmallCNN

    return SmallCNN(num_classes=10, in_chans=3, width=8)


def _resnet_cifar(depth):
    from src.models.resnet_cifar import resnet_cifar

    return lambda: resnet_cifar(depth=depth, num_classes=10, in_chans=3)


def _timm(name):
    from src.models.timm_net import create_timm_net

    return lambda: create_timm_net(name, num_classes=10, in_chans=3)


def _darts(genotype):
    from src.models.darts_net import NetworkCIFAR

    # the paper's cell at toy width/depth: same ops and wiring, seconds to export
    return lambda: NetworkCIFAR(C=8, num_classes=10, layers=5, auxiliary=True, genotype=genotype)


def _encoded_resnet():
    from src.models.encoded_resnet import EncodedResNet

    return EncodedResNet("1x8-1x16s2-1x32s2", num_classes=10)


def _speedrun():
    from src.models.speedrun_net import SpeedrunNet

    return SpeedrunNet(num_classes=10, in_chans=3, widths=[16, 32, 32], whiten_kernel=2, bn_momentum=0.6, bn_eps=1e-12, logit_scale=1 / 9)


# Every network family the project has: name -> (factory, input shape). A new family (DARTS, CARS
# eval nets, ...) is one line here; its export must match PyTorch within 1e-4 in onnxruntime.
NET_FAMILIES = {
    "small_cnn": (_small_cnn, (3, 16, 16)),
    "resnet_cifar20": (_resnet_cifar(20), (3, 32, 32)),
    "resnet_cifar18": (_resnet_cifar(18), (3, 32, 32)),
    "timm_mobilenetv3": (_timm("mobilenetv3_small_050"), (3, 32, 32)),
    "timm_resnet18": (_timm("resnet18"), (3, 32, 32)),
    "darts_v2": (_darts("DARTS_V2"), (3, 32, 32)),
    "pc_darts": (_darts("PC_DARTS"), (3, 32, 32)),
    "encoded_resnet": (_encoded_resnet, (3, 32, 32)),
    "speedrun": (_speedrun, (3, 32, 32)),
}


@pytest.mark.parametrize("family", list(NET_FAMILIES))
def test_onnx_export_matches_pytorch_with_dynamic_batch(family, tmp_path):
    factory, shape = NET_FAMILIES[family]
    torch.manual_seed(0)
    net = factory().eval()
    path = export_onnx(net, shape, tmp_path / f"{family}.onnx")
    # batch sizes other than the traced one: the batch axis must be dynamic
    for batch in (1, 3):
        images = torch.randn(batch, *shape)
        assert onnx_max_abs_diff(net, path, images) <= 1e-4
    session = ort_session(path)
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_inputs()[0].shape[0] == "batch"


def test_legacy_exporter_still_available(tmp_path):
    net = _small_cnn().eval()
    path = export_onnx(net, (3, 16, 16), tmp_path / "legacy.onnx", dynamo=False)
    assert onnx_max_abs_diff(net, path, torch.randn(2, 3, 16, 16)) <= 1e-4


def test_torchscript_round_trip(tmp_path):
    torch.manual_seed(0)
    factory, shape = NET_FAMILIES["resnet_cifar20"]
    net = factory().eval()
    path = export_torchscript(net, shape, tmp_path / "net.torchscript.pt")
    loaded = load_torchscript(path)
    images = torch.randn(5, *shape)  # not the traced batch size
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), net(images), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> str:
    """A real (briefly trained) checkpoint of the default digits run."""
    from conftest import compose_config

    out = tmp_path_factory.mktemp("digits_run")
    cfg = compose_config("train.yaml", out, ["trainer.max_epochs=2", "logger=none"])
    return train(cfg)["best_ckpt"]


@pytest.fixture
def compose_export(tmp_path):
    """configs/export.yaml with `overrides` (no timing unless asked), writing into tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def make(overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return compose("export.yaml", overrides=[f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path / 'logs'}",
                                                     "latency_threads=[]", *overrides])

    return make


def test_export_script_onnx_int8_with_sidecars(digits_ckpt, compose_export, tmp_path):
    out = tmp_path / "exported"
    result = export_checkpoint(compose_export([f"ckpt_path={digits_ckpt}", "int8=true", f"output_dir={out}",
                                               "calibration_images=64", "latency_threads=[1]", "repeats=3", "warmup=1"]))
    assert {Path(f).name for f in result["files"]} == {"model.onnx", "model.json", "model.int8.onnx", "model.int8.json"}
    assert result["max_abs_diff"] <= 1e-4
    assert result["int8_top1_agreement"] >= 0.9  # INT8 picks the fp32 class on nearly every image
    assert [r["backend"] for r in result["latency"]] == ["torch", "onnxruntime", "onnxruntime-int8"]
    sidecar = read_sidecar(out / "model.int8.onnx")
    assert sidecar["export"]["precision"] == "int8" and sidecar["class_names"] == [str(i) for i in range(10)]
    quantization = sidecar["export"]["quantization"]  # which ranges `auto` kept, and how well they agree
    assert quantization["calibration"].split(" over ")[0] in ("minmax", "percentile-99.99", "percentile-99.9")
    assert quantization["top1_agreement_with_fp32"] == result["int8_top1_agreement"]
    # on real test images the INT8 graph is as accurate as the fp32 one, within a few images
    from src.deploy.images import datamodule_for, split_images, top1_accuracy
    from src.deploy.trained_net import load_trained_net

    images, labels = split_images(datamodule_for(load_trained_net(digits_ckpt).config["data"]), "test")
    fp32 = top1_accuracy(lambda x: ort_run(ort_session(out / "model.onnx"), x), images, labels)
    int8 = top1_accuracy(lambda x: ort_run(ort_session(out / "model.int8.onnx"), x), images, labels)
    assert fp32 > 0.5 and abs(fp32 - int8) <= 0.03, (fp32, int8)


def test_export_beside_checkpoint_torchscript(digits_ckpt, compose_export):
    result = export_checkpoint(compose_export([f"ckpt_path={digits_ckpt}", "format=torchscript"]))
    stem = Path(digits_ckpt).stem
    assert [Path(f).name for f in result["files"]] == [f"{stem}.torchscript.pt", f"{stem}.torchscript.json"]
    assert Path(result["files"][0]).parent == Path(digits_ckpt).parent
    assert result["max_abs_diff"] <= 1e-4
    assert json.loads(Path(result["files"][1]).read_text())["export"]["format"] == "torchscript"


def test_export_bad_inputs_are_one_sentence(digits_ckpt, compose_export, tmp_path):
    with pytest.raises(AutoclsError, match="ckpt_path is missing; pass ckpt_path=<checkpoint from train.py>"):
        export_checkpoint(compose_export([]))
    with pytest.raises(AutoclsError, match="Unknown format 'tflite'; use format=onnx or format=torchscript."):
        export_checkpoint(compose_export([f"ckpt_path={digits_ckpt}", "format=tflite"]))
    with pytest.raises(AutoclsError, match="int8=maybe is not a switch; pass int8=true or int8=false."):
        export_checkpoint(compose_export([f"ckpt_path={digits_ckpt}", "int8=maybe"]))
    with pytest.raises(AutoclsError, match="does not exist; pass an existing file"):
        export_checkpoint(compose_export([f"ckpt_path={tmp_path / 'missing.ckpt'}"]))
    # a checkpoint whose run config is missing (e.g. saved by other code)
    ckpt = torch.load(digits_ckpt, weights_only=False)
    ckpt["autocls"]["config"] = {}
    torch.save(ckpt, tmp_path / "no_config.ckpt")
    with pytest.raises(AutoclsError, match="does not record its network config or data description"):
        export_checkpoint(compose_export([f"ckpt_path={tmp_path / 'no_config.ckpt'}"]))
    del ckpt["autocls"]
    torch.save(ckpt, tmp_path / "no_meta.ckpt")
    with pytest.raises(AutoclsError, match="has no autocls metadata"):
        export_checkpoint(compose_export([f"ckpt_path={tmp_path / 'no_meta.ckpt'}"]))
    with pytest.raises(AutoclsError, match="fp16=true exports an ONNX graph"):
        export_checkpoint(compose_export([f"ckpt_path={digits_ckpt}", "format=torchscript", "fp16=true"]))


def test_export_cli_prints_one_line_error(tmp_path):
    run = subprocess.run(
        [sys.executable, "scripts/export.py", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: Checkpoint {tmp_path / 'nope.ckpt'} does not exist; pass an existing file or ckpt_path=last."]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_onnx_export_on_cuda(tmp_path):
    from src.deploy.backends import DeployVariants, LatencyTarget

    net = _small_cnn().eval()
    variants = DeployVariants(net, (3, 16, 16), tmp_path)
    path = variants.onnx("fp16")
    session = ort_session(path)  # the CPU provider runs half graphs too (slowly): check the numbers
    assert "float16" in session.get_inputs()[0].type
    images = torch.randn(4, 3, 16, 16)
    got = ort_run(session, images.half().numpy()).astype(np.float32)
    with torch.inference_mode():
        expected = net(images).numpy()
    assert np.abs(got - expected).max() < 1e-2 * max(1.0, np.abs(expected).max())
    result = variants.measure(LatencyTarget(backend="torch", precision="fp16", device="cuda", batch_size=8), repeats=5)
    assert result.device == "cuda" and result.backend == "torch-fp16"
