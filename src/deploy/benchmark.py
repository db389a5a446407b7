"""Latency of one network across backends, thread counts and batch sizes (scripts/benchmark_latency.py,
scripts/deploy_table.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from src.deploy.backends import DeployVariants, LatencyTarget, parse_target
from src.deploy.latency import LatencyResult
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

CPU_BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
CUDA_BACKENDS = ("torch@cuda", "torch-fp16@cuda", "inductor@cuda", "inductor-fp16@cuda", "onnxruntime@cuda", "tensorrt@cuda",
                 "tensorrt-fp16@cuda")


def default_backends() -> list[str]:
    """The CPU backends, plus the CUDA ones when this machine has a GPU (those onnxruntime cannot
    run, e.g. without the TensorRT provider, are skipped with a note)."""
    return list(CPU_BACKENDS) + (list(CUDA_BACKENDS) if torch.cuda.is_available() else [])


def benchmark_targets(labels: Sequence[str], threads: Sequence[int], batch_sizes: Sequence[int]) -> list[LatencyTarget]:
    """Every (backend label, threads, batch size); CUDA targets once per batch size (threads do not apply)."""
    targets: list[LatencyTarget] = []
    for batch in batch_sizes:
        for t in threads:
            for label in labels:
                target = parse_target(label, threads=t, batch_size=batch)
                if target not in targets:
                    targets.append(target)
    return targets


def run_benchmark(
    variants: DeployVariants, targets: Sequence[LatencyTarget], *, warmup: int = 10, repeats: int = 50
) -> tuple[list[tuple[str, LatencyResult]], list[str]]:
    """Measured (label, result) rows, and one note per target this machine cannot run or this network
    cannot be built for (e.g. an INT8 engine that cannot trace it): one table still compares the rest."""
    rows, notes = [], []
    for target in targets:
        reason = target.unavailable_reason()
        result = None
        if not reason:
            try:
                result = variants.measure(target, warmup=warmup, repeats=repeats)
            except AutoclsError as err:
                reason = str(err)
        if result is None:
            note = f"{target.label} on {target.device}: skipped ({reason})"
            if note not in notes:
                notes.append(note)
                log.warning(note)
            continue
        log.info(f"{target.name}: median {result.median_ms:.3f} ms, p90 {result.p90_ms:.3f} ms")
        rows.append((target.label, result))
    return rows, notes
