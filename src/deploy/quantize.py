"""INT8 post-training static quantisation, calibrated on training images, in two engines.

* `quantize_onnx_static`: onnxruntime's static quantisation of an exported fp32 ONNX graph. The graph
  is first pre-processed (`quant_pre_process`: shape inference and onnxruntime's graph optimisation,
  which folds BatchNorm into the convolutions so they quantise as one op), then activations are
  calibrated over the calibration images (by default the range rule, min-max or a percentile, whose
  INT8 graph agrees best with fp32 on those images: `calibration_method="auto"`); weights are int8 per output channel,
  activations uint8 per tensor (U8S8, onnxruntime's fast combination on x86), written as
  QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into integer kernels (QDQ format).
  Two exact rewrites (`src.deploy.qdq_rewrites`) keep global average pools and HardSigmoid (SE gates,
  hard-swish) in integer arithmetic, so a MobileNetV3 runs without float islands.
* `quantize_torch_fx`: PyTorch's own INT8 path available in torch 2.14 without extra packages,
  FX graph-mode quantisation with the `x86` backend (fbgemm/oneDNN kernels), run op by op in eager.
* `quantize_torchao_pt2e`: the flow PyTorch now recommends for x86 (PT2 export quantisation, moved
  to the torchao package): a `torch.export` graph with quantise/dequantise nodes placed by torchao's
  `X86InductorQuantizer`, which `torch.compile` (inductor, weights frozen) lowers to fused oneDNN INT8
  kernels. Uncompiled it runs as a slow float reference.

docs/deployment.md says which of the three is fastest on x86 CPUs and why, and which onnxruntime quantiser options
were measured for this recipe (scripts/int8_recipes.py); the deployment path (`scripts/export.py
int8=true`, the latency tables) uses onnxruntime.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from src.deploy.onnx_export import INPUT_NAME
from src.deploy.qdq_rewrites import (
    clip_hard_sigmoid_inputs,
    global_average_pools,
    integer_hard_sigmoids,
)
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

# how activation ranges come from the calibration images (percentile-P: ranges cover the P-th
# percentile of absolute values, onnxruntime's histogram calibrator)
CALIBRATION_METHODS = ("minmax", "percentile-99.999", "percentile-99.99", "percentile-99.9", "entropy")
# what calibration_method="auto" tries (entropy is left out: it matched min-max on every network measured)
AUTO_CALIBRATIONS = ("minmax", "percentile-99.99", "percentile-99.9")


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def _check_calibration(calibration: torch.Tensor) -> None:
    if calibration.ndim != 4 or len(calibration) == 0:
        raise AutoclsError(
            f"Calibration needs a non-empty batch of images (N, C, H, W), got shape {tuple(calibration.shape)}; "
            "pass training images."
        )


def quantize_onnx_static(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: torch.Tensor,
    *,
    per_channel: bool = True,
    batch_size: int = 32,
    integer_rewrites: bool = True,
    calibration_method: str = "auto",
    quantizer_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write an INT8 (QDQ) copy of the ONNX model `fp32_path` to `out_path`, with activation ranges
    calibrated on `calibration` (normalised images, N x C x H x W).

    `integer_rewrites=False` skips the `qdq_rewrites` (onnxruntime's quantiser alone);
    `calibration_method` is one of `CALIBRATION_METHODS` (how activation ranges come from the
    calibration images), or "auto": each of `AUTO_CALIBRATIONS`, keeping the INT8 graph whose top-1
    agrees most often with the fp32 graph's on the calibration images (ties: the smaller logit
    error). The choice and its agreement are stored in the INT8 file's metadata (`int8_metadata`).
    Why: min-max ranges are set by the most extreme activation in the calibration set, and in a
    MobileNetV3 (SE gates, hard-swish) one outlier image can coarsen a whole layer (a MobileNetV3-Large
    lost 0.97 point with 256 calibration images and 8.6 with 1,024); percentile ranges clip it but
    cost plain ReLU networks resolution where their tails matter (docs/deployment.md, "Calibration").
    `quantizer_options` override keyword arguments of `onnxruntime.quantization.quantize_static`
    (`quant_format`, `activation_type`, `extra_options`, ...), to compare recipes
    (scripts/int8_recipes.py); the defaults are the recipe docs/deployment.md ("INT8 recipe") argues for."""
    _check_calibration(calibration)
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise AutoclsError(f"ONNX model {fp32_path} does not exist; export the fp32 model first.")
    if calibration_method != "auto" and calibration_method not in CALIBRATION_METHODS:
        raise AutoclsError(f"Unknown calibration method '{calibration_method}'; use auto or one of "
                           f"{', '.join(CALIBRATION_METHODS)}.")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"per_channel": per_channel, "batch_size": batch_size, "integer_rewrites": integer_rewrites,
                "quantizer_options": quantizer_options}
    expected = _logits(fp32_path, calibration)  # the fp32 reference every candidate is compared with
    if calibration_method != "auto":
        _quantize_once(fp32_path, out_path, calibration, method=calibration_method, **settings)
        method, (agreement, error) = calibration_method, _fidelity(expected, out_path, calibration)
    else:
        method, agreement, error = None, -1.0, 0.0
        with tempfile.TemporaryDirectory() as tmp:
            for candidate_method in AUTO_CALIBRATIONS:
                candidate = Path(tmp) / f"{candidate_method}.onnx"
                _quantize_once(fp32_path, candidate, calibration, method=candidate_method, **settings)
                candidate_agreement, candidate_error = _fidelity(expected, candidate, calibration)
                log.info(f"INT8 calibration {candidate_method}: top-1 agreement with fp32 {candidate_agreement:.4f}, "
                         f"logit error {candidate_error:.4f}")
                if (candidate_agreement, -candidate_error) > (agreement, -error):
                    method, agreement, error = candidate_method, candidate_agreement, candidate_error
                    shutil.copyfile(candidate, out_path)
    _write_metadata(out_path, method, (agreement, error))
    log.info(f"INT8 (onnxruntime, {method} ranges from {len(calibration)} images, top-1 agreement with fp32 "
             f"{agreement:.4f}) -> {out_path}")
    return out_path


def _quantize_once(fp32_path: Path, out_path: Path, calibration: torch.Tensor, *, method: str, per_channel: bool,
                   batch_size: int, integer_rewrites: bool, quantizer_options: Mapping[str, Any] | None) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = (b.detach().cpu().numpy().astype(np.float32) for b in _batches(calibration, batch_size))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        model = onnx.load(str(prepared))
        if integer_rewrites and global_average_pools(model) + clip_hard_sigmoid_inputs(model):
            onnx.save(model, str(prepared))
        calibration_options, quantizer_options = _calibration_options(method), dict(quantizer_options or {})
        options = {
            "quant_format": QuantFormat.QDQ,
            "per_channel": per_channel,
            "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8,
            **calibration_options,
            **quantizer_options,
            # a recipe's extra options (e.g. symmetric activations) add to the calibration's, not replace them
            "extra_options": {**calibration_options.get("extra_options", {}), **quantizer_options.get("extra_options", {})},
        }
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # histogram calibrators print progress
            quantize_static(str(prepared), str(out_path), Reader(), **options)
        log.debug(printed.getvalue())
        quantized = onnx.load(str(out_path))
        if integer_rewrites and integer_hard_sigmoids(quantized):
            onnx.save(quantized, str(out_path))


def _calibration_options(method: str) -> dict:
    from onnxruntime.quantization import CalibrationMethod

    if method == "minmax":
        return {"calibrate_method": CalibrationMethod.MinMax}
    if method == "entropy":
        return {"calibrate_method": CalibrationMethod.Entropy}
    percentile = float(method.removeprefix("percentile-"))
    return {"calibrate_method": CalibrationMethod.Percentile, "extra_options": {"CalibPercentile": percentile}}


def _logits(onnx_path: Path, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    from src.deploy.latency import ort_run, ort_session

    session = ort_session(onnx_path)
    return np.concatenate([ort_run(session, batch) for batch in _batches(images, batch_size)])


def _fidelity(expected: np.ndarray, int8_path: Path, images: torch.Tensor) -> tuple[float, float]:
    """(share of `images` on which the INT8 graph picks the class of the fp32 logits `expected`, mean over
    images of the relative L2 error of its logits). Per image, so an outlier image with huge logits
    weighs as much as any other."""
    got = _logits(int8_path, images)
    agreement = float((expected.argmax(1) == got.argmax(1)).mean())
    norms = np.maximum(np.linalg.norm(expected, axis=1), 1e-12)
    return agreement, float((np.linalg.norm(got - expected, axis=1) / norms).mean())


def _write_metadata(path: Path, method: str, fidelity: tuple[float, float]) -> None:
    model = onnx.load(str(path))
    entries = {"int8_calibration": method, "int8_top1_agreement": f"{fidelity[0]:.6f}",
               "int8_logit_error": f"{fidelity[1]:.6f}"}
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def int8_metadata(path: str | Path) -> dict[str, str]:
    """What `quantize_onnx_static` recorded in an INT8 file: `int8_calibration` (the range rule),
    `int8_top1_agreement` and `int8_logit_error` (against fp32, on the calibration images)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("int8_")}


def quantize_torch_fx(net: nn.Module, calibration: torch.Tensor, *, batch_size: int = 32) -> nn.Module:
    """An INT8 copy of `net` by torch.ao FX graph-mode static quantisation (x86 backend), calibrated on
    `calibration`; runs on the CPU. The network must be symbolically traceable by torch.fx."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    _check_calibration(calibration)
    if "x86" not in torch.backends.quantized.supported_engines:
        raise AutoclsError("This PyTorch build has no x86 quantised engine; use the onnxruntime INT8 path instead.")
    torch.backends.quantized.engine = "x86"
    model = copy.deepcopy(net).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (-> torchao)
        try:
            prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example_inputs=(calibration[:1].cpu(),))
        except Exception as err:
            raise AutoclsError(
                f"torch.fx cannot trace {type(net).__name__} for quantisation ({type(err).__name__}); "
                "use the onnxruntime INT8 path instead."
            ) from err
        with torch.inference_mode():
            for batch in _batches(calibration.cpu(), batch_size):
                prepared(batch)
        return convert_fx(prepared).eval()


def quantize_torchao_pt2e(net: nn.Module, calibration: torch.Tensor, *, batch_size: int = 32) -> nn.Module:
    """An INT8 copy of `net` by torchao's PT2E flow with `X86InductorQuantizer` (int8 per-channel
    weights, uint8 per-tensor activations, as the onnxruntime recipe), calibrated on `calibration`.

    The result is an exported graph module with a dynamic batch dimension. Compile it with
    `src.deploy.backends.frozen_compile` to run INT8 kernels (`DeployVariants` does, for the `inductor-int8`
    target; `torch.compile(options={"freezing": True})` fails on it); torchao forbids `.train()`/`.eval()`
    on it, so call it, do not re-mode it."""
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as err:
        raise AutoclsError(
            f"The torchao INT8 path needs the torchao package ({err}); pip install torchao, or use onnxruntime-int8."
        ) from err
    _check_calibration(calibration)
    model = copy.deepcopy(net).cpu().eval()
    # trace at batch 2 with a named batch dimension: torch.export specialises a dimension of size 1
    example = calibration[[0, -1]].cpu()
    try:
        exported = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    except Exception as err:
        raise AutoclsError(
            f"torch.export cannot capture {type(net).__name__} for quantisation ({type(err).__name__}); "
            "use the onnxruntime INT8 path instead."
        ) from err
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in _batches(calibration.cpu(), batch_size):
            prepared(batch)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    return converted
