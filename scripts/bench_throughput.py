"""Training throughput of our fast data path against a hand-written loop and a conventional DataLoader.

    python scripts/bench_throughput.py --data-dir data/cifar10 [--archive ../shared/data/cifar10-jpg.tar.gz]
        [--steps 100] [--warmup 20] [--batch-size 512] [--augmentations all|none standard ...]

ResNet-18 (CIFAR stem), batch 512, bf16 autocast, channels_last, SGD, on the CIFAR-10 JPG copy
(`--data-dir`, an ImageFolder root with train/; unpacked from `--archive` when missing). Images/s of
the training step, measured after `--warmup` steps over `--steps` steps, for

  (a) a raw PyTorch loop over GPU-resident uint8 data (index, /255, normalise, forward/backward/step);
  (b) ClassifierLitModule through Trainer.fit with our fast path (in-memory data on the device,
      augmentation in on_after_batch_transfer), with augmentation=none (as (a)) and =standard;
  (c) a conventional peer: torchvision ImageFolder + DataLoader(workers = cores, pinned memory) + CPU
      transforms (pad-crop, flip, to tensor, normalise), with the same plain loop as (a);

then (b) with every augmentation config, as its throughput cost relative to augmentation=none.
Prints markdown tables and the machine. `--device cpu --steps 2 --warmup 1 --batch-size 16` is a smoke run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch.nn import functional as F

from src.callbacks.throughput import Throughput
from src.datamodules.archive import ensure_split_folders
from src.models.resnet_cifar import resnet_cifar
from src.optim.optimizers import build_optimizer
from src.utils.instantiate import build_callbacks, build_datamodule, build_trainer
from src.utils.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# the recipe of experiment=cifar10_resnet18, shared by every path
LR, MOMENTUM, WEIGHT_DECAY, LABEL_SMOOTHING = 0.4, 0.9, 5e-4, 0.1


def compose_run(data_dir: Path, out: Path, args, augmentation: str) -> object:
    """experiment=cifar10_resnet18 on the JPG folder (in memory), one epoch of warmup+steps batches,
    no validation, checkpoints, logger or progress bar."""
    overrides = [
        "experiment=cifar10_resnet18", "data=image_folder", f"data.data_dir={data_dir}", "data.image_size=32",
        "data.crop_pct=1.0", "data.val_fraction=0", "data.in_memory=true", f"data.batch_size={args.batch_size}",
        f"data.mean=[{','.join(map(str, CIFAR_MEAN))}]", f"data.std=[{','.join(map(str, CIFAR_STD))}]",
        f"augmentation={augmentation}", "model.channels_last=true", "logger=none",
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}", f"trainer.precision={args.precision}",
        "trainer.max_epochs=1", f"paths.output_dir={out}", f"paths.log_dir={out / 'logs'}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
    with open_dict(cfg):
        # no checkpoint writing (enable_checkpointing=False refuses any ModelCheckpoint), no progress display
        unwanted = ("ModelCheckpoint", "RichProgressBar", "RichModelSummary", "CheckpointOnInterrupt")
        for key in [k for k, c in cfg.callbacks.items() if c and str(c.get("_target_", "")).endswith(unwanted)]:
            cfg.callbacks.pop(key)
        # the NaN guard reads the loss, which waits for the GPU: every 50 steps, as experiment=cifar10_speedrun
        cfg.callbacks.finite_loss.check_every_n_steps = 50
        cfg.trainer.update(limit_train_batches=args.warmup + args.steps, limit_val_batches=0, enable_progress_bar=False,
                           enable_model_summary=False, enable_checkpointing=False)
    return cfg


def lightning_throughput(data_dir: Path, args, augmentation: str) -> float:
    """(b): images/s of Trainer.fit on ClassifierLitModule with our data module."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(data_dir, Path(tmp), args, augmentation)
        pl.seed_everything(0, workers=True)
        datamodule = build_datamodule(cfg)
        model = instantiate(cfg.model)
        timer = Throughput(warmup_steps=args.warmup)
        trainer = build_trainer(cfg, callbacks=[timer, *build_callbacks(cfg)], logger=False)
        trainer.fit(model, datamodule=datamodule)
    return timer.images_per_second


def _net_and_optimizer(device: torch.device):
    net = resnet_cifar(depth=18, num_classes=10).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(net, name="sgd", lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    return net, optimizer


def _timed_loop(batches, net, optimizer, device: torch.device, args) -> float:
    """The plain training step over `batches` (an iterator of normalised float batches on the device);
    images/s after the warm-up, synchronising only at the ends."""
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else None

    def step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y, label_smoothing=LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for _ in range(args.steps):
        x, y = next(batches)
        step(x, y)
        images += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def raw_throughput(data_dir: Path, args) -> float:
    """(a): the same uint8 images, resident on the device, in a hand-written loop."""
    with tempfile.TemporaryDirectory() as tmp:
        datamodule = build_datamodule(compose_run(data_dir, Path(tmp), args, "none"))
    datamodule.setup()
    device = torch.device(args.device)
    split = datamodule.splits["train"]
    images, labels = split.images.to(device), split.labels.to(device)
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)

    def batches():
        while True:
            order = torch.randperm(len(labels), device=device)
            for b in range(len(labels) // args.batch_size):
                idx = order[b * args.batch_size : (b + 1) * args.batch_size]
                yield (images[idx].float().div_(255) - mean) / std, labels[idx]

    torch.manual_seed(0)
    net, optimizer = _net_and_optimizer(device)
    return _timed_loop(batches(), net, optimizer, device, args)


def peer_throughput(data_dir: Path, args) -> float:
    """(c): torchvision ImageFolder + DataLoader workers + CPU transforms, the same loop."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    dataset = datasets.ImageFolder(str(data_dir / "train"), transform=transform)
    device = torch.device(args.device)
    workers = os.cpu_count() or 1
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=True)

    def batches():
        for x, y in itertools.chain.from_iterable(itertools.repeat(loader)):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    torch.manual_seed(0)
    net, optimizer = _net_and_optimizer(device)
    return _timed_loop(batches(), net, optimizer, device, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/cifar10"))
    parser.add_argument("--archive", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--augmentations", nargs="+", default=["all"],
                        help="augmentation configs for the cost table ('all': every configs/augmentation/*.yaml)")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    data_dir = ensure_split_folders(args.data_dir, ("train",), args.archive)
    print(f"machine: {describe_machine()}")
    print(f"ResNet-18 (CIFAR stem), batch {args.batch_size}, {args.precision}, channels_last, {args.device}; "
          f"{args.steps} steps after {args.warmup} warm-up steps\n", flush=True)

    raw = raw_throughput(data_dir, args)
    print(f"(a) raw loop: {raw:,.0f} img/s", flush=True)
    ours = {"none": lightning_throughput(data_dir, args, "none")}
    print(f"(b) ours, augmentation=none: {ours['none']:,.0f} img/s", flush=True)
    ours["standard"] = lightning_throughput(data_dir, args, "standard")
    print(f"(b) ours, augmentation=standard: {ours['standard']:,.0f} img/s", flush=True)
    peer = peer_throughput(data_dir, args)
    print(f"(c) peer: {peer:,.0f} img/s\n", flush=True)

    print("| path | augmentation | img/s | ratio |")
    print("|---|---|---|---|")
    print(f"| (a) raw PyTorch loop, GPU-resident data | none | {raw:,.0f} | |")
    print(f"| (b) ClassifierLitModule + Trainer.fit, fast path | none | {ours['none']:,.0f} | b/a = {ours['none'] / raw:.3f} (goal >= 0.95) |")
    print(f"| (b) ClassifierLitModule + Trainer.fit, fast path | standard (pad-crop, flip) | {ours['standard']:,.0f} | b/c = {ours['standard'] / peer:.2f} (goal >= 2) |")
    print(f"| (c) ImageFolder + DataLoader({os.cpu_count()} workers) + CPU transforms | pad-crop, flip | {peer:,.0f} | |")

    names = args.augmentations
    if names == ["all"]:
        names = sorted(p.stem for p in (ROOT / "configs" / "augmentation").glob("*.yaml") if p.stem != "none")
    print("\n| augmentation | img/s | cost vs none (goal <= 10%) |")
    print("|---|---|---|")
    for name in names:
        if name not in ours:
            ours[name] = lightning_throughput(data_dir, args, name)
        print(f"| {name} | {ours[name]:,.0f} | {100 * (1 - ours[name] / ours['none']):.1f}% |", flush=True)


if __name__ == "__main__":
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(main)()
