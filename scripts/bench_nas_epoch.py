"""Seconds per search epoch of DARTS (first and second order) and PC-DARTS on CIFAR-10, measured over a
few training steps and projected to a full epoch and to the full search.

    python scripts/bench_nas_epoch.py                       # GPU if there is one, else CPU
    python scripts/bench_nas_epoch.py --steps 3 --warmup 1 --val-batches 1 data.batch_size=8  # CPU smoke

Each method is its experiment config exactly as `python train.py experiment=<name>` composes it (the
paper's 8-cell, 16-channel supernet, its batch size, optimisers and precision of `trainer=gpu`), run
by a Lightning Trainer for `warmup + steps` training batches and `val_batches` validation batches.
The images are random uint8 tensors of CIFAR-10's shape, resident on the device like the real CIFAR
data module's: a step's cost does not depend on pixel values, and no download is needed. The
projection uses the real split sizes of the config (50,000 training images minus `data.val_size`,
halved by `data.search_split`; the validation split once per epoch) and `trainer.max_epochs`; for
PC-DARTS the first `model.arch_start_epoch` epochs train the weights only and are timed separately.
Extra arguments are Hydra overrides applied to every method. Speeds are also given as a ratio to
DARTS first order measured in the same run.

CARS: once `configs/experiment/cifar_cars.yaml` exists (the CARS helper's
`src/lit_models/cars_search.py`), it is measured by the same harness (train and validation batches of
its own Lightning module); its epoch-end evolution is reported in the per-run overhead column.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from src.datamodules.base import ClassificationDataModule, TensorSplit
from src.utils.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_TRAIN = 50_000

# name -> overrides; "warmup phase" variants time the weight-only epochs of a delayed architecture start
METHODS = {
    "DARTS 1st order": ["experiment=cifar_darts"],
    "DARTS 2nd order": ["experiment=cifar_darts_2nd"],
    "PC-DARTS (k=4)": ["experiment=cifar_pcdarts"],
}
if (ROOT / "configs" / "experiment" / "cifar_cars.yaml").is_file():
    METHODS["CARS"] = ["experiment=cifar_cars"]


class RandomCifar(ClassificationDataModule):
    """Random uint8 images of CIFAR-10's shape (3 x 32 x 32, 10 classes), held in memory like CIFAR."""

    def __init__(self, n_train: int, n_val: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_train, self.n_val = n_train, n_val

    def _detect_num_classes(self) -> int:
        return 10

    def _load_splits(self) -> dict[str, TensorSplit]:
        gen = torch.Generator().manual_seed(0)

        def split(n: int) -> TensorSplit:
            images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
            return TensorSplit(images, torch.arange(n) % 10)

        return {"train": split(self.n_train), "val": split(self.n_val), "test": split(self.n_val)}


class BatchTimer(pl.Callback):
    """Wall time of every training and validation batch (the device synchronised at both ends)."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []
        self._start = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, *args) -> None:
        self._start = self._now()

    def on_train_batch_end(self, *args) -> None:
        self.train.append(self._now() - self._start)

    def on_validation_batch_start(self, *args) -> None:
        self._start = self._now()

    def on_validation_batch_end(self, *args) -> None:
        self.val.append(self._now() - self._start)


def compose_method(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train.yaml", overrides=overrides)


def measure(cfg, warmup: int, steps: int, val_batches: int) -> dict:
    """Time `warmup + steps` training batches and `val_batches` validation batches of the config's
    model; returns per-batch medians (warmup excluded) and the fit's other wall time."""
    data = cfg.data
    batch, eval_batch = int(data.batch_size), int(data.get("eval_batch_size") or data.batch_size)
    split = data.get("search_split")
    per_half = 1 if split is None else 2  # a search draws one batch from each half per step
    datamodule = RandomCifar(
        n_train=(warmup + steps + 1) * batch * per_half + 64,
        n_val=max(1, val_batches) * eval_batch,
        batch_size=batch,
        eval_batch_size=eval_batch,
        mean=list(data.mean),
        std=list(data.std),
        augmentation=instantiate(cfg.augmentation) if cfg.get("augmentation") else None,
        search_split=split,
    )
    model = instantiate(cfg.model)
    timer = BatchTimer()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = instantiate(
            cfg.trainer,
            default_root_dir=run_dir,
            callbacks=[timer],
            logger=False,
            max_epochs=1,
            limit_train_batches=warmup + steps,
            limit_val_batches=val_batches,
            limit_test_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            fast_dev_run=False,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        fit_s = time.perf_counter() - start
    timed = timer.train[warmup:]
    return {
        "step_s": statistics.median(timed),
        "val_batch_s": statistics.median(timer.val) if timer.val else 0.0,
        "overhead_s": fit_s - sum(timer.train) - sum(timer.val),
        "memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first (kernel selection, caches)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--val-batches", type=int, default=5, help="timed validation batches")
    parser.add_argument("--trainer", default=None, help="trainer config (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every method")
    args = parser.parse_args()
    trainer = args.trainer or ("gpu" if torch.cuda.is_available() else "cpu")

    rows = []
    for name, method in METHODS.items():
        cfg = compose_method([*method, f"trainer={trainer}", "logger=none", *args.overrides])
        pl.seed_everything(cfg.seed, workers=True)
        result = measure(cfg, args.warmup, args.steps, args.val_batches)
        arch_start = int(cfg.model.get("arch_start_epoch") or 0)
        warm = None
        if arch_start > 0:  # weight-only epochs cost less: time them too
            warm_cfg = compose_method([*method, f"trainer={trainer}", "logger=none", *args.overrides, "model.arch_start_epoch=1000000"])
            warm = measure(warm_cfg, args.warmup, args.steps, 0)["step_s"]
        data = cfg.data
        train_images = CIFAR10_TRAIN - int(data.get("val_size") or 0)
        split = data.get("search_split")
        half = min(round(train_images * split), train_images - round(train_images * split)) if split else train_images
        steps_per_epoch = half // int(data.batch_size)
        val_images = int(data.get("val_size") or 10_000)  # val_size=0 validates on the 10k test images
        eval_batch = int(data.get("eval_batch_size") or data.batch_size)
        val_s = result["val_batch_s"] * -(-val_images // eval_batch)
        epoch_s = result["step_s"] * steps_per_epoch + val_s
        epochs = int(cfg.trainer.max_epochs)
        warm_epochs = min(arch_start, epochs)
        warm_epoch_s = (warm if warm is not None else result["step_s"]) * steps_per_epoch + val_s
        search_s = warm_epochs * warm_epoch_s + (epochs - warm_epochs) * epoch_s
        rows.append((name, result, steps_per_epoch, epoch_s, epochs, search_s, warm))
        print(
            f"{name}: {result['step_s']:.3f} s/step x {steps_per_epoch} steps + {val_s:.1f} s validation = "
            f"{epoch_s:.1f} s/epoch; {epochs} epochs = {search_s / 3600:.2f} h", flush=True,
        )

    base = rows[0][3]
    print(f"\nmachine: {describe_machine()}")
    print(f"trainer={trainer}; {args.warmup} warm-up + {args.steps} timed steps, {args.val_batches} validation batches per method; "
          f"overrides: {' '.join(args.overrides) or 'none'}")
    memory = torch.cuda.is_available()
    header = "| method | s/step | steps/epoch | s/epoch | epoch time vs DARTS 1st | epochs | full search (h) | overhead (s) |"
    print(header + (" peak GPU memory (GiB) |" if memory else ""))
    print("|---" * (8 + memory) + "|")
    for name, result, steps, epoch_s, epochs, search_s, warm in rows:
        note = f" ({warm:.3f} before the arch start)" if warm is not None else ""
        line = (
            f"| {name} | {result['step_s']:.3f}{note} | {steps} | {epoch_s:.1f} | {epoch_s / base:.2f}x | {epochs} | "
            f"{search_s / 3600:.2f} | {result['overhead_s']:.1f} |"
        )
        print(line + (f" {result['memory_gb']:.2f} |" if memory else ""))


if __name__ == "__main__":
    main()
