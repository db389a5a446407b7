"""The deployment table of issue 6 (scripts/deploy_table.py): batch-1 CPU latency of torch eager,
onnxruntime fp32 and onnxruntime INT8 per model and thread count, and the INT8 top-1 change of a
trained checkpoint on its test split."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from src.deploy.backends import DeployVariants, LatencyTarget
from src.deploy.tables import markdown_table


def latency_rows(
    name: str,
    net: nn.Module,
    input_shape: tuple[int, int, int],
    calibration: torch.Tensor,
    threads: Sequence[int],
    *,
    warmup: int = 10,
    repeats: int = 50,
    session_config: Mapping[str, str] | None = None,
) -> list[dict]:
    """One dict per thread count: median/p90 ms of eager, onnxruntime fp32 and INT8 at batch 1 (both
    onnxruntime sessions with `session_config`)."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        variants = DeployVariants(net, input_shape, workdir, calibration=calibration)
        for t in threads:
            row: dict = {"model": name, "threads": t}
            for key, backend, precision in (("eager", "torch", "fp32"), ("ort", "onnxruntime", "fp32"),
                                            ("int8", "onnxruntime", "int8")):
                result = variants.measure(LatencyTarget(backend=backend, precision=precision, threads=t),
                                          warmup=warmup, repeats=repeats, session_config=session_config)
                row[f"{key}_ms"], row[f"{key}_p90_ms"] = result.median_ms, result.p90_ms
            rows.append(row)
    return rows


def latency_markdown(rows: Sequence[dict]) -> str:
    headers = ["model", "threads", "eager ms (p90)", "onnxruntime fp32 ms (p90)", "onnxruntime INT8 ms (p90)",
               "fp32 speed-up vs eager", "INT8 speed-up vs fp32", "INT8 speed-up vs eager"]
    body = [[r["model"], r["threads"], f"{r['eager_ms']:.3f} ({r['eager_p90_ms']:.3f})",
             f"{r['ort_ms']:.3f} ({r['ort_p90_ms']:.3f})", f"{r['int8_ms']:.3f} ({r['int8_p90_ms']:.3f})",
             f"{r['eager_ms'] / r['ort_ms']:.2f}x", f"{r['ort_ms'] / r['int8_ms']:.2f}x",
             f"{r['eager_ms'] / r['int8_ms']:.2f}x"] for r in rows]
    return markdown_table(headers, body)


def training_summary(ckpt_path: str | Path) -> dict:
    """How long the checkpoint's network was trained: epochs, optimizer steps, training images, and
    the run's wall time when its metrics.json is beside the checkpoints folder."""
    from src.deploy.trained_net import load_trained_net
    from src.utils.checkpoints import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    trained = load_trained_net(ckpt_path)
    config = trained.config
    summary = {
        "epochs_completed": int(ckpt.get("epoch", -1)) + 1,
        "global_step": int(ckpt.get("global_step", 0)),
        "max_epochs": (config.get("trainer") or {}).get("max_epochs"),
        "net": (config.get("model") or {}).get("net", {}).get("_target_"),
        "net_config": {k: v for k, v in (config.get("model") or {}).get("net", {}).items() if not str(k).startswith("_")},
        "data_dir": (config.get("data") or {}).get("data_dir") or (config.get("data") or {}).get("_target_"),
        "batch_size": (config.get("data") or {}).get("batch_size"),
    }
    metrics_file = Path(ckpt_path).resolve().parent.parent / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        summary.update(train_wall_time_s=metrics.get("wall_time_s"), run_test_acc=metrics.get("test/acc"),
                       run_val_acc_best=metrics.get("val/acc_best"))
    return summary


def int8_accuracy(ckpt_path: str | Path, *, calibration_images: int = 256, split: str = "test",
                  calibration_method: str = "auto") -> dict:
    """Top-1 of the checkpoint's network on `split` in onnxruntime fp32 and INT8 (calibrated on
    `calibration_images` training images with `calibration_method`), the drop in points, the range rule
    used, and the data sizes."""
    from src.deploy.images import calibration_images as draw_calibration
    from src.deploy.images import datamodule_for, split_images, top1_accuracy
    from src.deploy.latency import ort_run, ort_session
    from src.deploy.quantize import int8_metadata
    from src.deploy.trained_net import load_trained_net

    trained = load_trained_net(ckpt_path)
    datamodule = datamodule_for(trained.config["data"])
    calibration = draw_calibration(datamodule, calibration_images)
    images, labels = split_images(datamodule, split)
    with tempfile.TemporaryDirectory() as workdir:
        variants = DeployVariants(trained.net, trained.input_shape, workdir, calibration=calibration,
                                  int8_calibration=calibration_method)
        fp32_session, int8_session = ort_session(variants.onnx("fp32")), ort_session(variants.onnx("int8"))
        method = int8_metadata(variants.onnx("int8"))["int8_calibration"]
        eager = top1_accuracy(trained.net, images, labels)
        fp32 = top1_accuracy(lambda x: ort_run(fp32_session, x), images, labels)
        int8 = top1_accuracy(lambda x: ort_run(int8_session, x), images, labels)
    return {
        "split": split,
        "images": len(labels),
        "train_images": len(datamodule.splits["train"]),
        "calibration_images": len(calibration),
        "calibration_method": method,
        "eager_top1": eager,
        "fp32_top1": fp32,
        "int8_top1": int8,
        "int8_drop_points": 100 * (fp32 - int8),
        "net": trained.net,
        "input_shape": trained.input_shape,
        "calibration": calibration,
    }
