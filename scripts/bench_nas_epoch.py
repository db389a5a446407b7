"""Seconds per search epoch of DARTS (first and second order), PC-DARTS, CARS and BackboneNAS on
CIFAR-10, measured over a few training steps and projected to a full epoch and to the full search.

    python scripts/bench_nas_epoch.py                       # the GPU machine: 5 warm-up + 20 timed steps
    OMP_NUM_THREADS=2 python scripts/bench_nas_epoch.py     # a CPU: CPU-sized (1 + 2 steps, 1 val batch of 64)
    python scripts/bench_nas_epoch.py --methods cars backbone_nas --steps 5   # some methods only

Each method is its experiment config exactly as `python train.py experiment=<name>` composes it (the
paper's 8-cell, 16-channel supernet, its batch size, optimisers and precision of `trainer=gpu`), run
by a Lightning Trainer for `warmup + steps` training batches and `val_batches` validation batches.
The images are random uint8 tensors of CIFAR-10's shape, resident on the device like the real CIFAR
data module's: a step's cost does not depend on pixel values, and no download is needed. The
projection uses the real split sizes of the config (50,000 training images minus `data.val_size`,
halved by `data.search_split`; the validation split once per epoch) and `trainer.max_epochs`:

* DARTS / PC-DARTS: steps per epoch x s/step + the validation; PC-DARTS's first
  `model.arch_start_epoch` epochs train the weights only and are timed separately;
* CARS: the validation evaluates every candidate on the whole validation split, so it is projected
  per candidate: `population_size` candidates in a warm-up epoch, population + offspring in an
  evolving one;
* BackboneNAS: an epoch is one generation: `steps_per_candidate` steps that train all its networks
  (the measurement shortens the generation to the timed steps so that its validation runs), the
  epoch's remaining batches skipped, then the validation of every network.

On a CPU the defaults are CPU-sized (1 warm-up + 2 timed steps, 1 validation batch of 64 images):
the same networks and training batch sizes, fewer samples, so the projection is rougher. A DARTS
step of the paper's supernet at batch 64 is heavy for a small CPU: expect minutes per method on 2
cores (second order the longest) and pick a subset with `--methods` if needed. The first steps pay one-off costs (allocator, oneDNN/cuDNN kernel choice), hence the
untimed warm-up; the one-off setup (cost tables, the first generation) is the "overhead" column.
Extra arguments are Hydra overrides applied to every method. Epoch times are also given as a ratio
to DARTS first order measured in the same run.
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

# key -> (name, overrides)
METHODS = {
    "darts": ("DARTS 1st order", ["experiment=cifar_darts"]),
    "darts_2nd": ("DARTS 2nd order", ["experiment=cifar_darts_2nd"]),
    "pcdarts": ("PC-DARTS (k=4)", ["experiment=cifar_pcdarts"]),
    "cars": ("CARS", ["experiment=cifar_cars"]),
    "backbone_nas": ("BackboneNAS", ["experiment=cifar_backbone_nas"]),
}


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


def measure(cfg, warmup: int, steps: int, val_batches: int, val_batch_size: int | None = None) -> dict:
    """Time `warmup + steps` training batches and `val_batches` validation batches (of
    `val_batch_size` images, default the config's) of the config's model; returns the median step
    (warmup excluded), the median validation time per image, the fit's other wall time and how many
    candidates the validation evaluated (CARS, BackboneNAS)."""
    data = cfg.data
    batch = int(data.batch_size)
    eval_batch = val_batch_size or int(data.get("eval_batch_size") or data.batch_size)
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
    evaluated = trainer.callback_metrics.get("search/evaluated")  # CARS and BackboneNAS log it
    return {
        "step_s": statistics.median(timed),
        "val_image_s": statistics.median(timer.val) / eval_batch if timer.val else 0.0,
        "overhead_s": fit_s - sum(timer.train) - sum(timer.val),
        "evaluated": None if evaluated is None else int(evaluated),
        "memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def project(key: str, cfg, result: dict, warm_step_s: float | None) -> dict:
    """Steps per epoch, seconds per (evolving/architecture) epoch and for the whole search, from the
    measured per-batch times and the config's real sizes."""
    data, model = cfg.data, cfg.model
    train_images = CIFAR10_TRAIN - int(data.get("val_size") or 0)
    split = data.get("search_split")
    half = min(round(train_images * split), train_images - round(train_images * split)) if split else train_images
    steps_per_epoch = half // int(data.batch_size)
    val_images = int(data.get("val_size") or 10_000)  # val_size=0 validates on the 10k test images
    val_s = result["val_image_s"] * val_images  # per-image time: the same at any batch big enough to fill the device
    epochs = int(cfg.trainer.max_epochs)
    step_s, note = result["step_s"], ""

    if key == "cars":
        # validation time per candidate, times the candidates of each kind of epoch
        per_candidate = val_s / max(1, result["evaluated"] or 1)
        population = int(model.population_size)
        offspring = max(1, round(float(model.offspring_ratio) * population))
        warm = min(int(model.warmup_epochs), epochs)
        # as CarsSearchLitModule.evolving: from the last warm-up epoch on, every evolve_every epochs
        evolving = sum(1 for e in range(epochs) if e + 1 - warm >= 0 and (e + 1 - warm) % int(model.evolve_every) == 0)
        epoch_s = step_s * steps_per_epoch + per_candidate * (population + offspring)
        search_s = epochs * step_s * steps_per_epoch + per_candidate * (epochs * population + evolving * offspring)
        note = f"{population}+{offspring} candidates x {val_images} val images in {evolving} evolving epochs, {population} in the others"
    elif key == "backbone_nas":
        # one generation per epoch: steps_per_candidate steps train all its networks, then they are scored
        steps_per_epoch = min(int(model.steps_per_candidate), steps_per_epoch)
        epoch_s = step_s * steps_per_epoch + val_s
        search_s = epochs * epoch_s
        note = f"{result['evaluated'] or model.population_size} networks per generation, {steps_per_epoch} steps each"
    else:
        epoch_s = step_s * steps_per_epoch + val_s
        arch_start = min(int(model.get("arch_start_epoch") or 0), epochs)
        warm_epoch_s = (warm_step_s if warm_step_s is not None else step_s) * steps_per_epoch + val_s
        search_s = arch_start * warm_epoch_s + (epochs - arch_start) * epoch_s
        if warm_step_s is not None:
            note = f"{warm_step_s:.3f} s/step in the {arch_start} weight-only epochs"
    return {"steps": steps_per_epoch, "val_s": val_s, "epoch_s": epoch_s, "epochs": epochs, "search_s": search_s, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1, help="untimed training steps first (kernel selection, caches)")
    parser.add_argument("--steps", type=int, default=20 if cuda else 2, help="timed training steps")
    parser.add_argument("--val-batches", type=int, default=5 if cuda else 1, help="timed validation batches")
    parser.add_argument("--val-batch-size", type=int, default=None if cuda else 64,
                        help="images per timed validation batch (default: the config's eval batch on a GPU, 64 on a CPU)")
    parser.add_argument("--trainer", default=None, help="trainer config (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every method")
    args = parser.parse_args()
    trainer = args.trainer or ("gpu" if cuda else "cpu")
    print(f"machine: {describe_machine()}; torch threads: {torch.get_num_threads()}", flush=True)

    rows = []
    for key in args.methods:
        name, method = METHODS[key]
        common = [*method, f"trainer={trainer}", "logger=none", *args.overrides]
        if key == "backbone_nas":  # a generation as long as the timed steps, so that its validation runs
            common.append(f"model.steps_per_candidate={args.warmup + args.steps}")
        cfg = compose_method(common)
        pl.seed_everything(cfg.seed, workers=True)
        result = measure(cfg, args.warmup, args.steps, args.val_batches, args.val_batch_size)
        warm = None
        if int(cfg.model.get("arch_start_epoch") or 0) > 0:  # weight-only epochs cost less: time them too
            warm_cfg = compose_method([*common, "model.arch_start_epoch=1000000"])
            warm = measure(warm_cfg, args.warmup, args.steps, 0, args.val_batch_size)["step_s"]
        if key == "backbone_nas":  # project with the experiment's own generation length
            cfg = compose_method([*method, f"trainer={trainer}", "logger=none", *args.overrides])
        projected = project(key, cfg, result, warm)
        rows.append((name, result, projected))
        print(
            f"{name}: {result['step_s']:.3f} s/step x {projected['steps']} steps + validation = {projected['epoch_s']:.1f} s/epoch; "
            f"{projected['epochs']} epochs = {projected['search_s'] / 3600:.2f} h {projected['note']}", flush=True,
        )

    base = next((p["epoch_s"] for name, _, p in rows if name == METHODS["darts"][0]), None)
    print(f"\nmachine: {describe_machine()}; torch threads: {torch.get_num_threads()}")
    val_batch = args.val_batch_size or "the config's"
    print(f"trainer={trainer}; {args.warmup} warm-up + {args.steps} timed steps, {args.val_batches} validation batches of {val_batch} images per method; "
          f"overrides: {' '.join(args.overrides) or 'none'}")
    header = "| method | s/step | steps/epoch | s/epoch | epoch time vs DARTS 1st | epochs | full search (h) | overhead (s) | notes |"
    print(header + (" peak GPU memory (GiB) |" if cuda else ""))
    print("|---" * (9 + cuda) + "|")
    for name, result, p in rows:
        ratio = f"{p['epoch_s'] / base:.2f}x" if base else "-"
        line = (
            f"| {name} | {result['step_s']:.3f} | {p['steps']} | {p['epoch_s']:.1f} | {ratio} | {p['epochs']} | "
            f"{p['search_s'] / 3600:.2f} | {result['overhead_s']:.1f} | {p['note']} |"
        )
        print(line + (f" {result['memory_gb']:.2f} |" if cuda else ""))


if __name__ == "__main__":
    main()
