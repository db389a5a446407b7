"""INT8 post-training static quantisation, calibrated on training images, in two engines.

* `quantize_onnx_static`: onnxruntime's static quantisation of an exported fp32 ONNX graph. The graph
  is first pre-processed (`quant_pre_process`: shape inference and onnxruntime's graph optimisation,
  which folds BatchNorm into the convolutions so they quantise as one op), then activations are
  calibrated with min-max ranges over the calibration images; weights are int8 per output channel,
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
    quantizer_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write an INT8 (QDQ) copy of the ONNX model `fp32_path` to `out_path`, with activation ranges
    calibrated on `calibration` (normalised images, N x C x H x W).

    `integer_rewrites=False` skips the `qdq_rewrites` (onnxruntime's quantiser alone);
    `quantizer_options` override keyword arguments of `onnxruntime.quantization.quantize_static`
    (`quant_format`, `activation_type`, `extra_options`, ...). Both exist to compare recipes
    (scripts/int8_recipes.py); the defaults are the recipe docs/deployment.md ("INT8 recipe") argues for."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    _check_calibration(calibration)
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise AutoclsError(f"ONNX model {fp32_path} does not exist; export the fp32 model first.")
    out_path.parent.mkdir(parents=True, exist_ok=True)

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
        options = {
            "quant_format": QuantFormat.QDQ,
            "per_channel": per_channel,
            "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8,
            "calibrate_method": CalibrationMethod.MinMax,
            **(quantizer_options or {}),
        }
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # histogram calibrators print progress
            quantize_static(str(prepared), str(out_path), Reader(), **options)
        log.debug(printed.getvalue())
        quantized = onnx.load(str(out_path))
        if integer_rewrites and integer_hard_sigmoids(quantized):
            onnx.save(quantized, str(out_path))
    log.info(f"INT8 (onnxruntime, calibrated on {len(calibration)} images) -> {out_path}")
    return out_path


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
    `torch.compile(model, options={"freezing": True})` to run INT8 kernels (`DeployVariants` does, for the
    `inductor-int8` target); torchao forbids `.train()`/`.eval()` on it, so call it, do not re-mode it."""
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
