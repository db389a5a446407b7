"""Latency, parameters and FLOPs of a network: the figures hardware-aware search and deployment trust.

One timing loop (`time_calls`) serves every backend: warm-up calls first (allocator, kernel
selection, lazy initialisation, oneDNN primitive caches), then `repeats` timed calls, each timed on
its own; the result is the median (robust to the odd scheduler hiccup), the 90th percentile (what a
user waiting on one request feels) and the mean. The protocol follows PaddleClas' mobile
benchmark: batch 1 and batch N, CPU threads 1/2/4, warm-up, repeated runs.

* CPU: `time.perf_counter` around each call, the intra-op thread count set for the measurement and
  restored afterwards (torch: `torch.set_num_threads`; onnxruntime: the session's
  `intra_op_num_threads`).
* CUDA: CUDA events recorded around each call after a `synchronize`, so each figure is the time of
  one call alone and not of a queue of asynchronous launches.

Parameters and FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts
multiply-adds of matmuls and convolutions as 2 FLOPs each (so `flops / 2` is the "multi-adds" or
"MACs" figure many NAS papers call FLOPs).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.utils.errors import AutoclsError


@dataclass
class LatencyResult:
    """Latency of one call (one batch) in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    threads: int | None  # intra-op threads (None: the backend's default); None on CUDA
    device: str  # "cpu" or "cuda"
    backend: str  # e.g. "torch", "torch-fp16", "onnxruntime", "onnxruntime-int8"
    batch_size: int = 1
    min_ms: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def images_per_s(self) -> float:
        return 1000.0 * self.batch_size / self.median_ms if self.median_ms > 0 else float("inf")


def time_calls(
    call: Callable[[], object],
    *,
    warmup: int = 10,
    repeats: int = 50,
    device: str = "cpu",
) -> list[float]:
    """Milliseconds of each of `repeats` calls of `call()` after `warmup` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise AutoclsError(f"repeats={repeats} and warmup={warmup} must be >= 1 and >= 0; pass sensible counts.")
    for _ in range(warmup):
        call()
    times = []
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeats):
            torch.cuda.synchronize()
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            call()
            times.append((time.perf_counter() - begin) * 1000.0)
    return times


def summarise(times_ms: list[float], *, threads: int | None, device: str, backend: str, batch_size: int) -> LatencyResult:
    ordered = sorted(times_ms)
    return LatencyResult(
        median_ms=statistics.median(ordered),
        p90_ms=float(np.percentile(ordered, 90)),
        mean_ms=statistics.fmean(ordered),
        repeats=len(ordered),
        threads=threads,
        device=device,
        backend=backend,
        batch_size=batch_size,
        min_ms=ordered[0],
    )


@contextmanager
def deterministic_algorithms_off():
    """Run a deployed-style forward pass with PyTorch's deterministic-algorithm mode off, restoring it
    afterwards: a training run in the same process (`trainer.deterministic=true`) leaves it on, a
    deployed model runs without it, and some kernels (quantised ones) refuse to run under it."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@contextmanager
def _timing_settings(threads: int | None):
    """torch's intra-op thread count set to `threads` (None: unchanged) and deterministic algorithms
    off, both restored on exit."""
    before = torch.get_num_threads()
    if threads is not None and threads < 1:
        raise AutoclsError(f"threads={threads} must be a positive number of CPU threads.")
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with deterministic_algorithms_off():
            yield
    finally:
        torch.set_num_threads(before)


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise AutoclsError(f"Unknown device '{device}'; use cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise AutoclsError("device=cuda was asked for but CUDA is not available here; measure with device=cpu.")


def measure_latency(
    model: nn.Module | Callable[[torch.Tensor], object],
    example: torch.Tensor,
    *,
    threads: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> LatencyResult:
    """Latency of `model(example)` in eager PyTorch under `torch.inference_mode`.

    An `nn.Module` is put in eval mode; if its parameters are not on `device` (or `dtype` asks for
    another precision, e.g. `torch.float16` on CUDA), a copy is moved there and the caller's module
    is left as it was. `threads` applies to CPU runs (torch's intra-op threads, restored afterwards).
    `backend` labels the result (default "torch", "torch-fp16" for half precision).
    """
    _check_device(device)
    if isinstance(model, nn.Module):
        model = _module_on(model, device, dtype)
    example = example.to(device=device, dtype=dtype or example.dtype)
    label = backend or ("torch" if dtype in (None, torch.float32) else f"torch-{_dtype_name(dtype)}")
    with torch.inference_mode(), _timing_settings(threads if device == "cpu" else None):
        times = time_calls(lambda: model(example), warmup=warmup, repeats=repeats, device=device)
    return summarise(
        times, threads=threads if device == "cpu" else None, device=device, backend=label, batch_size=len(example)
    )


def _module_on(module: nn.Module, device: str, dtype: torch.dtype | None) -> nn.Module:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    same = tensor is None or (tensor.device.type == device and (dtype is None or tensor.dtype == dtype))
    if not same:
        module = copy.deepcopy(module).to(device=device, dtype=dtype)
    return module.eval()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


# --- onnxruntime ----------------------------------------------------------------------------------
ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    # TensorRT builds an engine for the graph; nodes it cannot take run on CUDA, then CPU
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort_session(model: str | Path | bytes, *, threads: int | None = None, provider: str = "cpu", fp16: bool = False,
                session_config: Mapping[str, str] | None = None):
    """An onnxruntime `InferenceSession` for a model file (or serialised bytes) with `threads`
    intra-op threads (None: onnxruntime's default, one per physical core) and full graph
    optimisation; `provider` is cpu, cuda or tensorrt (`fp16` lets TensorRT build fp16 kernels).
    `session_config`: onnxruntime session config entries (e.g. `session.intra_op.allow_spinning`,
    `session.dynamic_block_base`), to measure the thread pool's settings."""
    import onnxruntime as ort

    if provider not in ORT_PROVIDERS:
        raise AutoclsError(f"Unknown onnxruntime provider '{provider}'; use one of {', '.join(ORT_PROVIDERS)}.")
    wanted = ORT_PROVIDERS[provider][0]
    if wanted not in ort.get_available_providers():
        raise AutoclsError(
            f"onnxruntime here has no {wanted} (available: {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu with that provider or measure on the cpu."
        )
    if isinstance(model, (str, Path)) and not Path(model).is_file():
        raise AutoclsError(f"ONNX model {model} does not exist; export one with scripts/export.py first.")
    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise AutoclsError(f"threads={threads} must be a positive number of CPU threads.")
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # a CNN is one chain of ops: parallelism is within each op
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in (session_config or {}).items():
        try:
            options.add_session_config_entry(str(key), str(value))
        except Exception as err:  # onnxruntime refuses malformed entries
            raise AutoclsError(f"onnxruntime refuses the session config entry {key}={value} ({err}); "
                               "see onnxruntime_session_options_config_keys.h for the keys.") from err
    providers: list = list(ORT_PROVIDERS[provider])
    if provider == "tensorrt":
        providers[0] = ("TensorrtExecutionProvider", {"trt_fp16_enable": fp16})
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=providers)


def ort_run(session, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """The first output of `session` for one input batch."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(array)})[0]


def measure_onnx_latency(
    model: str | Path | bytes,
    example: torch.Tensor | np.ndarray,
    *,
    threads: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
    provider: str = "cpu",
    fp16: bool = False,
    backend: str = "onnxruntime",
    session_config: Mapping[str, str] | None = None,
) -> LatencyResult:
    """Latency of an ONNX model in onnxruntime, with the same timing loop as `measure_latency`.

    On cpu the input is a host array (as a deployed service has it). On cuda/tensorrt the input and
    output are bound to GPU memory (I/O binding), so the figure is the network's time as for torch's
    CUDA timing, without host-device copies.
    """
    session = ort_session(model, threads=threads, provider=provider, fp16=fp16, session_config=session_config)
    array = example.detach().cpu().numpy() if isinstance(example, torch.Tensor) else example
    input_type = session.get_inputs()[0].type
    if "float16" in input_type:
        array = array.astype(np.float16)
    array = np.ascontiguousarray(array)
    if provider == "cpu":
        name = session.get_inputs()[0].name
        times = time_calls(lambda: session.run(None, {name: array}), warmup=warmup, repeats=repeats)
        device = "cpu"
    else:
        import onnxruntime as ort

        binding = session.io_binding()
        binding.bind_ortvalue_input(session.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        binding.bind_output(session.get_outputs()[0].name, "cuda")
        times = time_calls(lambda: session.run_with_iobinding(binding), warmup=warmup, repeats=repeats, device="cuda")
        device = "cuda"
    return summarise(
        times, threads=threads if device == "cpu" else None, device=device, backend=backend, batch_size=len(array)
    )


# --- size ---------------------------------------------------------------------------------------
def count_params_flops(net: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(parameters, FLOPs of one forward pass on `example`) with torch's own FLOP counter
    (FlopCounterMode: a multiply-add is 2 FLOPs; only matmul/conv/attention-like ops count).
    For a per-image figure pass a batch of one."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in net.parameters())
    was_training = net.training
    net.eval()
    try:
        device = next(iter(net.parameters()), example).device
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            net(example.to(device))
    finally:
        net.train(was_training)
    return params, int(counter.get_total_flops())
