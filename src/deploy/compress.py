"""Prune a trained network, fine-tune it briefly with the project's own training, and report what
changed: parameters, FLOPs, latency and top-1 before and after (Vega's compression step)."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from src.deploy.backends import DeployVariants, LatencyTarget
from src.deploy.images import split_images, top1_accuracy
from src.deploy.latency import count_params_flops
from src.deploy.onnx_export import example_input
from src.deploy.prune import prune_channels
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


def training_datamodule(run_config: dict):
    """The data module of a checkpoint's run with its training augmentation (for fine-tuning)."""
    from src.utils.instantiate import build_datamodule

    cfg = OmegaConf.create({"data": run_config["data"], "augmentation": run_config.get("augmentation")})
    return build_datamodule(cfg)


def fine_tune(
    net: nn.Module,
    run_config: dict,
    datamodule,
    *,
    epochs: int = 1,
    overrides: Sequence[str] = (),
    max_steps: int = -1,
) -> nn.Module:
    """Train `net` for `epochs` with the recipe of the run that produced it: its ClassifierLitModule
    settings (loss, optimizer, schedule over the new, short length), data and augmentation, on the
    run's trainer settings without checkpoints or loggers. `overrides` are dotlist changes to that
    run config (e.g. `optimizer.lr=0.01`). Returns the fine-tuned network (on the CPU, eval mode)."""
    if epochs < 1:
        raise AutoclsError(f"fine-tune epochs={epochs} must be at least 1 (or skip fine-tuning).")
    cfg = OmegaConf.merge(OmegaConf.create(run_config), OmegaConf.from_dotlist(list(overrides)))
    if "model" not in cfg or "trainer" not in cfg:
        raise AutoclsError("The checkpoint's run config has no model or trainer section; fine-tune needs a train.py checkpoint.")
    model = instantiate(cfg.model, net=net)
    model.train()  # Lightning keeps the modes it is given: a network from eval would train with frozen BatchNorm
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(max_epochs=epochs, min_epochs=1, max_steps=max_steps, logger=False, callbacks=[],
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer_cfg.pop("default_root_dir", None)
    trainer: pl.Trainer = instantiate(trainer_cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, datamodule=datamodule)
    return model.net.cpu().eval()


def describe_net(
    net: nn.Module,
    input_shape: tuple[int, int, int],
    images: torch.Tensor,
    labels: torch.Tensor,
    target: LatencyTarget,
    workdir: str | Path,
    *,
    warmup: int = 10,
    repeats: int = 50,
) -> dict:
    """Parameters, FLOPs (one image), latency on `target` (exported, as deployed) and top-1 on
    (`images`, `labels`)."""
    net = net.cpu().eval()
    params, flops = count_params_flops(net, example_input(input_shape, 1))
    variants = DeployVariants(net, input_shape, workdir, calibration=images[:256] if target.precision == "int8" else None)
    latency = variants.measure(target, warmup=warmup, repeats=repeats)
    return {
        "params_m": params / 1e6,
        "mflops": flops / 1e6,
        "latency_ms": latency.median_ms,
        "latency_p90_ms": latency.p90_ms,
        "top1": top1_accuracy(net, images, labels),
    }


def _save(net: nn.Module, folder: Path, datamodule, ratio, epochs: int) -> None:
    """The pruned, fine-tuned network as a whole-module pickle (`model.pt`, load with
    `torch.load(..., weights_only=False)`: its layer widths are no longer those of any config) beside
    the ONNX export `describe_net` wrote, and that export's sidecar."""
    from src.deploy.sidecar import write_sidecar

    folder.mkdir(parents=True, exist_ok=True)  # describe_net creates it only when it exports ONNX
    torch.save(net, folder / "model.pt")
    if (folder / "model.onnx").is_file():
        write_sidecar(folder / "model.onnx", datamodule.describe(),
                      {"format": "onnx", "precision": "fp32", "pruning_ratio": ratio, "fine_tune_epochs": epochs},
                      crop_pct=getattr(datamodule, "crop_pct", None))


def compress(
    net: nn.Module,
    run_config: dict,
    datamodule,
    ratio: float | Mapping[str, float],
    *,
    epochs: int = 1,
    overrides: Sequence[str] = (),
    target: LatencyTarget | None = None,
    workdir: str | Path,
    eval_split: str = "test",
    warmup: int = 10,
    repeats: int = 50,
) -> tuple[nn.Module, dict]:
    """Prune `net` by `ratio`, fine-tune it for `epochs`, and measure before, right after pruning and
    after fine-tuning. Returns the fine-tuned network and a row of figures:
    `params_m`, `mflops`, `latency_ms`, `top1` (after fine-tuning), `top1_pruned` (before it),
    `*_before` for the original network, `ratio`, `epochs`."""
    target = target or LatencyTarget(backend="onnxruntime", threads=1, batch_size=1)
    workdir = Path(workdir)
    images, labels = split_images(datamodule, eval_split)
    input_shape = tuple(images.shape[1:])
    before = describe_net(net, input_shape, images, labels, target, workdir / "original", warmup=warmup, repeats=repeats)
    pruned = prune_channels(net, example_input(input_shape, 2), ratio)
    top1_pruned = top1_accuracy(pruned, images, labels)
    tuned = fine_tune(copy.deepcopy(pruned), run_config, datamodule, epochs=epochs, overrides=overrides)
    name = f"pruned_{ratio}" if not isinstance(ratio, Mapping) else "pruned_per_stage"
    after = describe_net(tuned, input_shape, images, labels, target, workdir / name, warmup=warmup, repeats=repeats)
    _save(tuned, workdir / name, datamodule, ratio, epochs)
    row = {"ratio": ratio if not isinstance(ratio, Mapping) else dict(ratio), "epochs": epochs, **after,
           "top1_pruned": top1_pruned, **{f"{k}_before": v for k, v in before.items()}}
    log.info(
        f"ratio {ratio}: params {before['params_m']:.3f}M -> {after['params_m']:.3f}M, MFLOPs {before['mflops']:.1f} -> "
        f"{after['mflops']:.1f}, latency {before['latency_ms']:.3f} -> {after['latency_ms']:.3f} ms, top-1 "
        f"{before['top1']:.4f} -> {top1_pruned:.4f} (pruned) -> {after['top1']:.4f} ({epochs} fine-tune epochs)"
    )
    return tuned, row
