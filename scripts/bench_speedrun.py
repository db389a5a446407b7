"""experiment=cifar10_speedrun against the published airbench94, side by side on the same data.

    python scripts/bench_speedrun.py --data-dir data/cifar10 --airbench-src vendor_wheels/airbench-0.1.8
        [--archive ../shared/data/cifar10-jpg.tar.gz] [--seeds 0 1 2] [-- extra overrides for our runs]

Both train on the shared CIFAR-10 JPG copy (`--data-dir`: ImageFolder root with train/ and test/,
unpacked from `--archive` when missing): decoded once by our ImageFolder data module, our run keeps
the uint8 tensors on the device, and airbench gets the very same tensors as its `cifar10/{train,
test}.pt` files (train in a seeded shuffled order, as CIFAR's own files are, since airbench
whitens from the first 5000). airbench is imported from its unpacked sdist (`--airbench-src`, made
by `pip download airbench --no-deps --no-binary :all: -d vendor_wheels/` and `tar xzf`), so the GPU
machine needs no registry.

Per seed: our train time is the fit's wall time (Throughput callback: whitening, 10 epochs, the
final TTA validation and checkpoint), its accuracy the test split with flip TTA; airbench's time is
the wall time of `train94(verbose=False)` (network, whitening, 9.9 epochs), its accuracy
`evaluate(..., tta_level=2)` (flip + translate, its published setting) and, for reference,
`tta_level=1` (flip, like ours). One warm-up run of each comes first and is not counted.
Prints a markdown table (mean, spread) and the machine.

`--device cpu --seeds 0 --skip-airbench -- trainer.max_epochs=1 +trainer.limit_train_batches=2`
is a smoke run of our side (airbench needs CUDA).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from src.callbacks.throughput import Throughput
from src.datamodules.archive import ensure_split_folders
from src.utils.instantiate import build_callbacks, build_datamodule, build_trainer
from src.utils.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def compose_ours(data_dir: Path, out: Path, seed: int, device: str, extra: list[str]):
    overrides = [
        "experiment=cifar10_speedrun", "data=image_folder", "~data.val_size", f"data.data_dir={data_dir}", "data.image_size=32",
        "data.crop_pct=1.0", "data.val_fraction=0", "data.in_memory=true", "data.batch_size=1024",
        "data.eval_batch_size=2000", f"data.mean=[{','.join(map(str, CIFAR_MEAN))}]",
        f"data.std=[{','.join(map(str, CIFAR_STD))}]", f"trainer={'gpu' if device == 'cuda' else 'cpu'}",
        "logger=none", f"seed={seed}", f"paths.output_dir={out}", f"paths.log_dir={out / 'logs'}", *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
    with open_dict(cfg):
        for key in ("rich_progress_bar", "model_summary"):
            cfg.callbacks.pop(key, None)
        cfg.trainer.update(enable_progress_bar=False, enable_model_summary=False)
    return cfg


def run_ours(data_dir: Path, seed: int, args) -> dict:
    """One run of experiment=cifar10_speedrun: fit time and test accuracy (flip TTA, final weights)."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_ours(data_dir, Path(tmp), seed, args.device, args.overrides)
        pl.seed_everything(seed, workers=True)
        datamodule = build_datamodule(cfg)
        model = instantiate(cfg.model)
        timer = Throughput()
        trainer = build_trainer(cfg, callbacks=[timer, *build_callbacks(cfg)], logger=False)
        trainer.fit(model, datamodule=datamodule)
        test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    return {"seconds": timer.fit_seconds, "acc": test["test/acc"]}


def decoded_cifar(data_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """The train and test splits as our data module decodes them (uint8 NCHW, labels, class names)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_ours(data_dir, Path(tmp), 0, "cpu", [])
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    return {name: (datamodule.splits[name].images, datamodule.splits[name].labels, datamodule.class_names)
            for name in ("train", "test")}


@contextmanager
def airbench_workdir(data_dir: Path):
    """A working directory holding `cifar10/{train,test}.pt` in airbench's format (uint8 NHWC images):
    airbench's train() reads the test split from ./cifar10 by name."""
    splits = decoded_cifar(data_dir)
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cifar10"
        folder.mkdir()
        for name, (images, labels, classes) in splits.items():
            if name == "train":  # CIFAR's own files are in random order; airbench whitens from the first 5000
                order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
                images, labels = images[order], labels[order]
            torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels, "classes": classes},
                       folder / f"{name}.pt")
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(previous)


def run_airbench(airbench, seed: int) -> dict:
    train_loader = airbench.CifarLoader("cifar10", train=True, batch_size=1024, aug={"flip": True, "translate": 2},
                                        altflip=True)
    test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    torch.manual_seed(seed)
    torch.cuda.synchronize()
    start = time.perf_counter()
    net = airbench.train94(train_loader, verbose=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "acc": airbench.evaluate(net, test_loader, tta_level=2),
            "acc_flip": airbench.evaluate(net, test_loader, tta_level=1)}


def summary(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f} (min {min(values) * scale:.{digits}f}, max {max(values) * scale:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/cifar10"))
    parser.add_argument("--archive", type=Path, default=None)
    parser.add_argument("--airbench-src", type=Path, default=Path("vendor_wheels/airbench-0.1.8"),
                        help="the unpacked airbench sdist (the folder holding airbench/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--skip-airbench", action="store_true")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for our runs (after --)")
    args = parser.parse_args()
    data_dir = ensure_split_folders(args.data_dir, ("train", "test"), args.archive)
    print(f"machine: {describe_machine()}\n", flush=True)

    results: dict[str, list[dict]] = {}
    if not args.no_warmup:  # CUDA context, cuDNN autotuning, the decode cache
        run_ours(data_dir, 0, argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, "trainer.max_epochs=1"]}))
    results["ours"] = []
    for seed in args.seeds:
        results["ours"].append(run_ours(data_dir, seed, args))
        print(f"ours seed {seed}: {results['ours'][-1]}", flush=True)

    if args.skip_airbench or args.device != "cuda":
        print("airbench94: skipped (it needs CUDA)" if not args.skip_airbench else "airbench94: skipped", flush=True)
    else:
        sys.path.insert(0, str(args.airbench_src.resolve()))
        import airbench

        with airbench_workdir(data_dir):
            if not args.no_warmup:
                airbench.warmup94(airbench.CifarLoader("cifar10", train=True, batch_size=1024, aug={"flip": True, "translate": 2}))
            results["airbench94"] = []
            for seed in args.seeds:
                results["airbench94"].append(run_airbench(airbench, seed))
                print(f"airbench94 seed {seed}: {results['airbench94'][-1]}", flush=True)

    print(f"\nCIFAR-10 JPG copy ({data_dir}), seeds {args.seeds}; machine: {describe_machine()}\n")
    print("| recipe | test accuracy % (mean ± sd) | train time s (mean ± sd) |")
    print("|---|---|---|")
    labels = {"ours": "experiment=cifar10_speedrun (flip TTA)", "airbench94": "airbench94 (flip + translate TTA)"}
    for name, runs in results.items():
        print(f"| {labels[name]} | {summary([r['acc'] for r in runs], 100)} | {summary([r['seconds'] for r in runs])} |")
    if "airbench94" in results:
        runs = results["airbench94"]
        print(f"| airbench94, flip TTA only | {summary([r['acc_flip'] for r in runs], 100)} | |")
        ours_time = statistics.mean(r["seconds"] for r in results["ours"])
        theirs_time = statistics.mean(r["seconds"] for r in runs)
        gap = 100 * (statistics.mean(r["acc"] for r in results["ours"]) - statistics.mean(r["acc"] for r in runs))
        print(f"\ntime ratio ours/airbench94: {ours_time / theirs_time:.2f} (goal <= 1.5); "
              f"accuracy difference: {gap:+.2f} points (goal >= 0)")


if __name__ == "__main__":
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(main)()
