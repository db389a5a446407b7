"""Export a network to ONNX (checked by onnxruntime against PyTorch) and to TorchScript.

ONNX uses PyTorch's `torch.export`-based exporter (`dynamo=True`, the default and recommended one
since PyTorch 2.9; the older TorchScript-based exporter is deprecated and warns that it will be
removed). `dynamo=False` selects the old one for a network `torch.export` cannot capture. The batch
axis is dynamic (`batch`), so one file serves batch 1 and batch N. The graph has one input `images`
(normalised float images, N x C x H x W) and one output `logits`.

The exported graph is a traced copy: a network whose Python control flow depends on its input values
would be frozen to the path the example took, which is why every export is verified numerically.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.deploy.latency import deterministic_algorithms_off, ort_run, ort_session
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "logits"
# batch used to trace: torch.export specialises a dimension of size 1, so a dynamic batch needs >= 2
_TRACE_BATCH = 2
# past this, weights go to a `<name>.onnx.data` file beside the graph (protobuf's 2 GB limit)
_EXTERNAL_DATA_BYTES = 1_500_000_000


def example_input(input_shape: tuple[int, int, int], batch_size: int = 1, *, seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """Random normalised-looking images (standard normal), reproducible by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, *input_shape, generator=generator)
    return images.to(device=device, dtype=dtype)


def export_onnx(
    net: nn.Module,
    input_shape: tuple[int, int, int],
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    dynamo: bool = True,
    opset: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Write `net` (in eval mode) as an ONNX file at `path` for inputs of shape (N, *input_shape).

    `dtype=torch.float16` with `device="cuda"` exports a half-precision graph (for GPUs). Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example_input(input_shape, _TRACE_BATCH if dynamic_batch else 1, dtype=dtype, device=device)
    was_training = net.training
    net.eval()
    try:
        with warnings.catch_warnings():
            # the exporters' notes about deprecations inside torch are not the user's business
            warnings.simplefilter("ignore")
            if dynamo:
                _export_dynamo(net, example, path, dynamic_batch, opset)
            else:
                _export_legacy(net, example, path, dynamic_batch, opset)
    except AutoclsError:
        raise
    except Exception as err:
        raise AutoclsError(
            f"ONNX export of {type(net).__name__} failed ({type(err).__name__}: {_first_line(err)}); "
            f"try the other exporter (dynamo={not dynamo}) or export format=torchscript."
        ) from err
    finally:
        net.train(was_training)
    return path


def _export_dynamo(net: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int | None) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    program = torch.onnx.export(
        net,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        verbose=False,
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    program.save(path, external_data=weight_bytes > _EXTERNAL_DATA_BYTES)


def _export_legacy(net: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int | None) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(
        net,
        (example,),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes=axes,
        opset_version=opset or 17,
    )


def onnx_max_abs_diff(net: nn.Module, onnx_path: str | Path, example: torch.Tensor, *, provider: str = "cpu") -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's logits for `example`."""
    session = ort_session(onnx_path, provider=provider)
    was_training = net.training
    net.eval()
    try:
        device = next(iter(net.parameters()), example).device
        with torch.inference_mode():
            expected = net(example.to(device)).float().cpu().numpy()
    finally:
        net.train(was_training)
    got = ort_run(session, example).astype(np.float32)
    if got.shape != expected.shape:
        raise AutoclsError(f"The ONNX model returns shape {got.shape} where PyTorch gives {expected.shape}; re-export it.")
    return float(np.abs(got - expected).max())


def verify_onnx(net: nn.Module, onnx_path: str | Path, example: torch.Tensor, *, atol: float = 1e-4) -> float:
    """`onnx_max_abs_diff`, raising when it exceeds `atol` (a broken export must not ship)."""
    diff = onnx_max_abs_diff(net, onnx_path, example)
    if not diff <= atol:  # also catches NaN
        raise AutoclsError(
            f"{onnx_path} differs from the PyTorch network by {diff:.3g} (> {atol:g}) on the same input; "
            "try the other exporter (dynamo=false) or report the network."
        )
    log.info(f"ONNX check: max |onnxruntime - torch| = {diff:.2e} on a batch of {len(example)}")
    return diff


# --- TorchScript -----------------------------------------------------------------------------------
def export_torchscript(net: nn.Module, input_shape: tuple[int, int, int], path: str | Path) -> Path:
    """Trace `net` (eval mode) on an example batch and save it with `torch.jit.save`.

    Tracing, not scripting: timm and our networks are plain feed-forward graphs, and tracing accepts
    Python that `torch.jit.script` rejects. The batch size stays free (traced ops are shape-generic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), deterministic_algorithms_off():
            warnings.simplefilter("ignore")  # TorchScript's own deprecation notice
            traced = torch.jit.trace(net, example_input(input_shape, _TRACE_BATCH), check_trace=False)
            traced = torch.jit.freeze(traced.eval())
        torch.jit.save(traced, str(path))
    except Exception as err:
        raise AutoclsError(
            f"TorchScript export of {type(net).__name__} failed ({type(err).__name__}: {_first_line(err)}); "
            "export format=onnx instead."
        ) from err
    finally:
        net.train(was_training)
    return path


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    if not Path(path).is_file():
        raise AutoclsError(f"TorchScript file {path} does not exist; export one with scripts/export.py format=torchscript.")
    return torch.jit.load(str(path), map_location="cpu").eval()


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."
