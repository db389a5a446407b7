"""The export task behind `scripts/export.py`: checkpoint -> deployable files + latency on this machine.

Files (beside the checkpoint as `<ckpt stem>.*`, or in `output_dir` as `model.*`):

* `format=onnx`: `<stem>.onnx` (fp32, dynamic batch, checked by onnxruntime against PyTorch),
  `<stem>.int8.onnx` with `int8=true` (onnxruntime static quantisation), `<stem>.fp16.onnx` with
  `fp16=true` (CUDA);
* `format=torchscript`: `<stem>.torchscript.pt` (traced, frozen, checked after a save/load round
  trip), `<stem>.int8.torchscript.pt` with `int8=true` (torch.ao x86 static quantisation);

each with its `.json` sidecar (`src.deploy.sidecar`): the checkpoint's data description and the
export settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from src.deploy.backends import DeployVariants, LatencyTarget
from src.deploy.latency import LatencyResult, measure_latency
from src.deploy.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    example_input,
    export_torchscript,
    load_torchscript,
)
from src.deploy.sidecar import write_sidecar
from src.deploy.tables import latency_table
from src.deploy.trained_net import TrainedNet, load_trained_net
from src.utils.errors import AutoclsError
from src.utils.machine import describe_machine

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")


def export_checkpoint(cfg: DictConfig) -> dict:
    """Export `cfg.ckpt_path` as configured (configs/export.yaml); returns the written files, the
    export checks and the latency results."""
    from src.utils.instantiate import resolve_ckpt_path

    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise AutoclsError(f"Unknown format '{fmt}'; use format=onnx or format=torchscript.")
    for flag in ("int8", "fp16", "dynamo"):
        if not isinstance(cfg[flag], bool):  # `int8=maybe` would otherwise count as true
            raise AutoclsError(f"{flag}={cfg[flag]} is not a switch; pass {flag}=true or {flag}=false.")
    if cfg.fp16 and fmt != "onnx":
        raise AutoclsError("fp16=true exports an ONNX graph for GPUs; use it with format=onnx.")
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        raise AutoclsError("ckpt_path is missing; pass ckpt_path=<checkpoint from train.py> or ckpt_path=last.")
    ckpt_path = resolve_ckpt_path(str(cfg.ckpt_path), cfg.paths.log_dir)
    trained = load_trained_net(ckpt_path)
    out_dir, stem = (Path(cfg.output_dir), "model") if cfg.output_dir else (Path(ckpt_path).parent, Path(ckpt_path).stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration = _calibration(trained, int(cfg.calibration_images)) if cfg.int8 else None
    settings = {"checkpoint": str(Path(ckpt_path).resolve()), "torch_version": torch.__version__,
                "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "dynamic_batch": True}
    if fmt == "onnx":
        result = _export_onnx(cfg, trained, out_dir, stem, calibration, settings)
    else:
        result = _export_torchscript(cfg, trained, out_dir, stem, calibration, settings)
    for path in result["files"]:
        log.info(f"Wrote {path}")
    if result["latency"]:
        print(f"Latency on {describe_machine()} (batch 1, {cfg.repeats} timed runs after {cfg.warmup} warm-up):")
        print(latency_table(result["latency"], baseline="torch"))
    result["latency"] = [{"backend": name, **r.as_dict()} for name, r in result["latency"]]
    return result


def _calibration(trained: TrainedNet, count: int) -> torch.Tensor:
    from src.deploy.images import calibration_images, datamodule_for

    data_cfg = trained.config.get("data")
    if not data_cfg:
        raise AutoclsError(f"{trained.path} does not record its data config, which INT8 calibration needs; export with int8=false.")
    return calibration_images(datamodule_for(data_cfg), count)


def _crop_pct(trained: TrainedNet) -> float | None:
    return (trained.config.get("data") or {}).get("crop_pct")


def _export_onnx(cfg, trained: TrainedNet, out_dir: Path, stem: str, calibration, settings: dict) -> dict:
    variants = DeployVariants(trained.net, trained.input_shape, out_dir, calibration=calibration,
                              int8_calibration=str(cfg.int8_calibration), verify_atol=float(cfg.verify_atol),
                              dynamo=bool(cfg.dynamo), opset=cfg.opset, stem=stem)
    base = dict(settings, format="onnx", exporter="dynamo" if cfg.dynamo else "torchscript", opset=cfg.opset)
    files = []
    fp32 = variants.onnx("fp32")
    files += [fp32, write_sidecar(fp32, trained.data, dict(base, precision="fp32", max_abs_diff=variants.max_abs_diff),
                                  crop_pct=_crop_pct(trained))]
    result: dict = {"max_abs_diff": variants.max_abs_diff}
    if cfg.int8:
        from src.deploy.quantize import int8_metadata

        int8 = variants.onnx("int8")
        recorded = int8_metadata(int8)
        agreement = float(recorded["int8_top1_agreement"])
        quant = {"engine": "onnxruntime static, QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor",
                 "calibration": f"{recorded['int8_calibration']} over {len(calibration)} training images",
                 "top1_agreement_with_fp32": agreement}
        files += [int8, write_sidecar(int8, trained.data, dict(base, precision="int8", quantization=quant),
                                      crop_pct=_crop_pct(trained))]
        result["int8_top1_agreement"] = agreement
        log.info(f"INT8 and fp32 agree on the top-1 class of {100 * agreement:.1f}% of the calibration images")
    if cfg.fp16:
        fp16 = variants.onnx("fp16")
        files += [fp16, write_sidecar(fp16, trained.data, dict(base, precision="fp16"), crop_pct=_crop_pct(trained))]
    latency = []
    for threads in cfg.latency_threads or ():
        for backend, precision in [("torch", "fp32"), ("onnxruntime", "fp32")] + ([("onnxruntime", "int8")] if cfg.int8 else []):
            target = LatencyTarget(backend=backend, precision=precision, threads=int(threads))
            latency.append((target.label, variants.measure(target, warmup=cfg.warmup, repeats=cfg.repeats)))
    return dict(result, files=[str(f) for f in files], latency=latency)


def _export_torchscript(cfg, trained: TrainedNet, out_dir: Path, stem: str, calibration, settings: dict) -> dict:
    net, shape = trained.net, trained.input_shape
    path = export_torchscript(net, shape, out_dir / f"{stem}.torchscript.pt")
    loaded = load_torchscript(path)
    example = example_input(shape, 4)
    with torch.inference_mode():
        diff = float((loaded(example) - net(example)).abs().max())
    if not diff <= float(cfg.verify_atol):
        raise AutoclsError(f"The TorchScript file {path} differs from the network by {diff:.3g}; export format=onnx instead.")
    base = dict(settings, format="torchscript", exporter="torch.jit.trace")
    files = [path, write_sidecar(path, trained.data, dict(base, precision="fp32", max_abs_diff=diff), crop_pct=_crop_pct(trained))]
    models: list[tuple[str, torch.nn.Module]] = [("torch", net), ("torchscript", loaded)]
    if cfg.int8:
        from src.deploy.quantize import quantize_torch_fx

        quantized = quantize_torch_fx(net, calibration)
        int8_path = export_torchscript(quantized, shape, out_dir / f"{stem}.int8.torchscript.pt")
        quant = {"engine": "torch.ao FX static, x86", "calibration": f"{len(calibration)} training images"}
        files += [int8_path, write_sidecar(int8_path, trained.data, dict(base, precision="int8", quantization=quant),
                                           crop_pct=_crop_pct(trained))]
        models.append(("torchscript-int8", load_torchscript(int8_path)))
    latency: list[tuple[str, LatencyResult]] = []
    for threads in cfg.latency_threads or ():
        for name, model in models:
            latency.append((name, measure_latency(model, example_input(shape, 1), threads=int(threads),
                                                  warmup=cfg.warmup, repeats=cfg.repeats, backend=name)))
    return {"files": [str(f) for f in files], "max_abs_diff": diff, "latency": latency}
