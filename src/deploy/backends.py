"""Where a network can run, and one object that builds each runnable form of a network once.

A `LatencyTarget` names a backend (torch eager, torch.compile's inductor, onnxruntime, TensorRT through onnxruntime), a
precision (fp32, fp16, int8), a device, a thread count and a batch size. `DeployVariants` holds
one trained network and builds, on first use and then cached, what each target runs: the fp32 ONNX
file, its INT8 copy (calibrated on the images it was given), a half-precision ONNX file for GPUs,
the torch.ao INT8 module, torch.compile'd modules (torchao's PT2E INT8 for `inductor-int8`). The latency callback, `scripts/export.py` and the benchmark scripts all
measure through `DeployVariants.measure`, so their figures mean the same thing.

Supported combinations:

| backend     | fp32       | fp16 | int8                   |
|-------------|------------|------|------------------------|
| torch       | cpu, cuda  | cuda | cpu (torch.ao FX, x86) |
| inductor    | cpu, cuda  | cuda | cpu (torchao PT2E, x86)|
| onnxruntime | cpu, cuda  | cuda | cpu (static QDQ)       |
| tensorrt    | cuda       | cuda | -                      |
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from src.deploy.latency import LatencyResult, measure_latency, measure_onnx_latency
from src.deploy.onnx_export import example_input, export_onnx, verify_onnx
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "inductor", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
DEVICES = ("cpu", "cuda")
_SUPPORTED = {
    ("torch", "fp32"): ("cpu", "cuda"),
    ("torch", "fp16"): ("cuda",),
    ("torch", "int8"): ("cpu",),
    ("inductor", "fp32"): ("cpu", "cuda"),
    ("inductor", "fp16"): ("cuda",),
    ("inductor", "int8"): ("cpu",),
    ("onnxruntime", "fp32"): ("cpu", "cuda"),
    ("onnxruntime", "fp16"): ("cuda",),
    ("onnxruntime", "int8"): ("cpu",),
    ("tensorrt", "fp32"): ("cuda",),
    ("tensorrt", "fp16"): ("cuda",),
}


@dataclass(frozen=True)
class LatencyTarget:
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int | None = 1  # CPU intra-op threads; ignored on cuda
    batch_size: int = 1

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.backend, BACKENDS, "backend"),
            (self.precision, PRECISIONS, "precision"),
            (self.device, DEVICES, "device"),
        ):
            if value not in allowed:
                raise AutoclsError(f"Unknown {what} '{value}'; use one of {', '.join(allowed)}.")
        devices = _SUPPORTED.get((self.backend, self.precision), ())
        if self.device not in devices:
            where = f"only on {' or '.join(devices)}" if devices else "not at all"
            raise AutoclsError(
                f"{self.backend} runs {self.precision} {where}, not on {self.device}; pick another device or precision."
            )
        if self.device == "cuda":
            object.__setattr__(self, "threads", None)  # CPU threads mean nothing to a CUDA measurement
        if self.batch_size < 1 or (self.threads is not None and self.threads < 1):
            raise AutoclsError(f"batch_size={self.batch_size} and threads={self.threads} must be positive.")

    @property
    def label(self) -> str:
        """e.g. `onnxruntime`, `onnxruntime-int8`, `torch-fp16`: the backend as tables print it."""
        return self.backend if self.precision == "fp32" else f"{self.backend}-{self.precision}"

    @property
    def name(self) -> str:
        """Unique key, e.g. `onnxruntime-int8_cpu_t1_b1` (used in logged metric names)."""
        threads = f"_t{self.threads}" if self.device == "cpu" and self.threads else ""
        return f"{self.label}_{self.device}{threads}_b{self.batch_size}"

    def unavailable_reason(self) -> str | None:
        """Why this machine cannot run the target (None: it can)."""
        if self.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        if self.backend == "inductor" and self.device == "cpu" and not _cpp_compiler():
            return "no C++ compiler for inductor's CPU kernels (set CXX or install g++)"
        if self.backend == "inductor" and self.precision == "int8" and importlib.util.find_spec("torchao") is None:
            return "torchao is not installed (pip install torchao)"
        if self.backend in ("onnxruntime", "tensorrt") and self.device == "cuda":
            import onnxruntime as ort

            wanted = "TensorrtExecutionProvider" if self.backend == "tensorrt" else "CUDAExecutionProvider"
            if wanted not in ort.get_available_providers():
                return f"onnxruntime has no {wanted}"
        return None

    def as_dict(self) -> dict:
        return asdict(self)


def _cpp_compiler() -> str | None:
    return next(filter(None, (shutil.which(name) for name in (os.environ.get("CXX", ""), "g++", "clang++") if name)), None)


def frozen_compile(module: nn.Module):
    """`torch.compile(module)` as a function whose first call compiles with inductor's `freezing` (weights
    become constants, so INT8 weights are pre-packed once). The flag is patched around that call only:
    passed as `torch.compile(options=...)` it breaks torchao's INT8 convolutions (the pre-packing then
    runs on fake tensors). A function, not a module: measure_latency calls .eval() on modules, which
    torchao's exported graphs refuse."""
    from torch._inductor import config as inductor_config

    compiled = torch.compile(module)
    compiled_once = []

    def run(images: torch.Tensor) -> torch.Tensor:
        if compiled_once:
            return compiled(images)
        try:
            with inductor_config.patch(freezing=True):
                out = compiled(images)
        except Exception as err:  # inductor's errors are pages long; the first line names the op
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise AutoclsError(f"torch.compile could not build {type(module).__name__} ({first_line}); "
                               "measure the torch or onnxruntime backends instead.") from err
        compiled_once.append(True)
        return out

    return run


def parse_target(label: str, *, threads: int | None = 1, batch_size: int = 1) -> LatencyTarget:
    """A target from its short label `<backend>[-<precision>][@<device>]`, as scripts take them:
    `torch`, `onnxruntime-int8`, `torch-fp16@cuda`, `tensorrt-fp16`. The device defaults to cpu, or to
    cuda where only cuda can run the combination (fp16, tensorrt)."""
    name, _, device = label.partition("@")
    backend, _, precision = name.partition("-")
    precision = precision or "fp32"
    if not device:
        device = "cpu" if "cpu" in _SUPPORTED.get((backend, precision), ("cpu",)) else "cuda"
    return LatencyTarget(backend=backend, precision=precision, device=device,
                         threads=threads if device == "cpu" else None, batch_size=batch_size)


def targets_from_config(entries) -> list[LatencyTarget]:
    """`LatencyTarget`s from config entries (dicts with the target's fields)."""
    return [LatencyTarget(**dict(entry)) for entry in entries]


class DeployVariants:
    """The runnable forms of one network (see the module docstring), built into `workdir` on demand.

    Args:
        net: The trained network (any device; copies are made, the original is not changed).
        input_shape: (C, H, W) of one image.
        workdir: Where ONNX files go (`<stem>.onnx`, `<stem>.int8.onnx`, `<stem>.fp16.onnx`).
        stem: The file name stem of the exported files.
        calibration: Normalised training images for INT8 calibration (needed only for int8 targets).
        int8_calibration: How onnxruntime INT8 takes activation ranges from them (`quantize_onnx_static`'s
            `calibration_method`: auto, minmax, percentile-99.9, ...).
        verify_atol: Every fp32 ONNX export is checked against PyTorch at this max abs difference.
    """

    def __init__(
        self,
        net: nn.Module,
        input_shape: tuple[int, int, int],
        workdir: str | Path,
        *,
        calibration: torch.Tensor | None = None,
        int8_calibration: str = "auto",
        verify_atol: float = 1e-4,
        dynamo: bool = True,
        opset: int | None = None,
        stem: str = "model",
    ) -> None:
        self.net = copy.deepcopy(net).cpu().eval()
        self.stem = stem
        self.input_shape = tuple(int(v) for v in input_shape)
        self.workdir = Path(workdir)
        self.calibration, self.int8_calibration = calibration, int8_calibration
        self.verify_atol, self.dynamo, self.opset = verify_atol, dynamo, opset
        self.max_abs_diff: float | None = None
        self._onnx: dict[str, Path] = {}
        self._torch: dict[str, nn.Module] = {}
        self._compiled: dict[tuple, object] = {}

    # --- building -------------------------------------------------------------------------------
    def onnx(self, precision: str = "fp32") -> Path:
        if precision not in self._onnx:
            self._onnx[precision] = self._build_onnx(precision)
        return self._onnx[precision]

    def _build_onnx(self, precision: str) -> Path:
        if precision == "fp32":
            path = export_onnx(self.net, self.input_shape, self.workdir / f"{self.stem}.onnx", dynamo=self.dynamo, opset=self.opset)
            self.max_abs_diff = verify_onnx(self.net, path, example_input(self.input_shape, 4), atol=self.verify_atol)
            return path
        if precision == "int8":
            from src.deploy.quantize import quantize_onnx_static

            return quantize_onnx_static(self.onnx("fp32"), self.workdir / f"{self.stem}.int8.onnx", self._calibration(),
                                        calibration_method=self.int8_calibration)
        if precision == "fp16":
            if not torch.cuda.is_available():
                raise AutoclsError("An fp16 export is for GPUs and needs CUDA here; export fp32 (or int8 for CPUs) instead.")
            half = copy.deepcopy(self.net).to(device="cuda", dtype=torch.float16)
            return export_onnx(half, self.input_shape, self.workdir / f"{self.stem}.fp16.onnx", dynamo=self.dynamo,
                               opset=self.opset, dtype=torch.float16, device="cuda")
        raise AutoclsError(f"Unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")

    def torch_model(self, precision: str = "fp32") -> nn.Module:
        if precision == "fp32":
            return self.net
        if precision == "int8":
            if "int8" not in self._torch:
                from src.deploy.quantize import quantize_torch_fx

                self._torch["int8"] = quantize_torch_fx(self.net, self._calibration())
            return self._torch["int8"]
        return self.net  # fp16: measure_latency casts a CUDA copy

    def compiled_model(self, target: LatencyTarget):
        """`torch.compile` (inductor, weights frozen as constants) of the target's form of the network,
        as a plain callable. One per target: inductor specialises its kernels to the input shape and
        fixes their OpenMP thread count when it generates them, on the first call, so `measure` makes
        that call inside the target's thread setting (its warm-up)."""
        key = (target.precision, target.device, target.threads, target.batch_size)
        if key not in self._compiled:
            if target.precision == "int8":
                if "pt2e_int8" not in self._torch:
                    from src.deploy.quantize import quantize_torchao_pt2e

                    self._torch["pt2e_int8"] = quantize_torchao_pt2e(self.net, self._calibration())
                module = self._torch["pt2e_int8"]
            else:
                dtype = torch.float16 if target.precision == "fp16" else torch.float32
                module = copy.deepcopy(self.net).to(device=target.device, dtype=dtype).eval()
            self._compiled[key] = frozen_compile(module)
        return self._compiled[key]

    def _calibration(self) -> torch.Tensor:
        if self.calibration is None:
            raise AutoclsError("INT8 needs calibration images and none were given; pass the training data (or drop int8).")
        return self.calibration

    # --- measuring ------------------------------------------------------------------------------
    def measure(self, target: LatencyTarget, *, warmup: int = 10, repeats: int = 50,
                session_config: Mapping[str, str] | None = None) -> LatencyResult:
        """`target`'s latency; `session_config` goes to onnxruntime targets (see `ort_session`)."""
        reason = target.unavailable_reason()
        if reason:
            raise AutoclsError(f"Cannot measure {target.name} here ({reason}); measure a cpu target instead.")
        example = example_input(self.input_shape, target.batch_size)
        threads = target.threads if target.device == "cpu" else None
        dtype = torch.float16 if target.precision == "fp16" else None
        if target.backend == "torch":
            return measure_latency(self.torch_model(target.precision), example, threads=threads, warmup=warmup,
                                   repeats=repeats, device=target.device, dtype=dtype, backend=target.label)
        if target.backend == "inductor":
            # at least one warm-up call: it compiles, and must do so under the target's thread count
            return measure_latency(self.compiled_model(target), example, threads=threads, warmup=max(1, warmup),
                                   repeats=repeats, device=target.device, dtype=dtype, backend=target.label)
        provider = "tensorrt" if target.backend == "tensorrt" else target.device
        # TensorRT builds its fp16 engine from the fp32 graph; onnxruntime-CUDA fp16 runs the half graph
        onnx_precision = "fp32" if target.backend == "tensorrt" else target.precision
        return measure_onnx_latency(self.onnx(onnx_precision), example, threads=threads, warmup=warmup, repeats=repeats,
                                    provider=provider, fp16=target.precision == "fp16", backend=target.label,
                                    session_config=session_config)
