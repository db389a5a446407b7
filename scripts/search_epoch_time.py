"""Seconds per search epoch of CARS, split into supernet training and member
evaluation + evolution, projected to the experiment's full search.

    python scripts/search_epoch_time.py [--experiment cifar_cars] [--epochs 3] [-- overrides]
    python scripts/search_epoch_time.py --experiment cifar_cars -- trainer=gpu          # the GPU figure
    OMP_NUM_THREADS=1 python scripts/search_epoch_time.py --experiment digits_cars      # a laptop CPU

It times whole epochs on the real data, so on a CPU it is for the toy-sized digits_cars; for the
CIFAR-10 searches at the paper's size on a CPU, `scripts/bench_nas_epoch.py` times a few batches of
each method (DARTS, PC-DARTS, CARS, BackboneNAS) and projects them to the full search.

Runs `python train.py experiment=<experiment> trainer.max_epochs=<epochs>` with the CSV logger and
reads `search/train_s` and `search/eval_s` of every epoch from its metrics.csv. Epoch 0 includes
one-off costs (cost tables, lazy CUDA/oneDNN initialisation), so the projection uses the later
epochs: (mean train_s + mean eval_s) x the experiment's max_epochs. Warm-up epochs evaluate only
the population (no offspring), so an evolving epoch's evaluation costs about twice theirs; the
projection counts evolving epochs as measured when any were, and says so.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from src.utils.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]


def full_search_epochs(experiment: str, extra: list[str]) -> tuple[int, int]:
    """(max_epochs, warmup_epochs) the experiment would run with."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=[f"experiment={experiment}", *[o for o in extra if "=" in o and not o.startswith("~")]])
    return int(cfg.trainer.max_epochs), int(cfg.model.get("warmup_epochs", 0) or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="cifar_cars")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="overrides for the run (after --)")
    args = parser.parse_args()

    full_epochs, warmup = full_search_epochs(args.experiment, args.extra)
    log_dir = Path(tempfile.mkdtemp(prefix="search_epoch_time_"))
    # a short run whose epochs do evolve: warm-up shortened to one epoch unless given
    warm = [] if any(o.startswith("model.warmup_epochs") for o in args.extra) or not warmup else ["model.warmup_epochs=1"]
    overrides = [f"experiment={args.experiment}", f"trainer.max_epochs={args.epochs}", "logger=csv", "test=false",
                 "~callbacks.rich_progress_bar", "~callbacks.model_summary", f"paths.log_dir={log_dir}", *warm, *args.extra]
    print(f"machine: {describe_machine()}")
    print(f"command: python train.py {' '.join(overrides)}", flush=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], check=True, cwd=ROOT,
                   env={**os.environ, "WANDB_MODE": "disabled"}, stdout=subprocess.DEVNULL)
    (metrics_csv,) = log_dir.glob("train/runs/*/csv/metrics.csv")
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("search/eval_s")]
    epochs = [(int(r["epoch"]), float(r.get("search/train_s") or "nan"), float(r["search/eval_s"]), float(r.get("search/evaluated") or 0))
              for r in rows]
    print("epoch  train_s  eval_s  candidates")
    for epoch, train_s, eval_s, n in epochs:
        print(f"{epoch:5d}  {train_s:7.1f}  {eval_s:6.1f}  {n:10.0f}")
    later = epochs[1:] or epochs
    train_s = statistics.mean(e[1] for e in later)
    eval_s = statistics.mean(e[2] for e in later)
    print(f"per epoch (epochs {later[0][0]}-{later[-1][0]}): {train_s:.1f} s training + {eval_s:.1f} s evaluation/evolution")
    print(f"projected full search ({args.experiment}: {full_epochs} epochs, {warmup} of them warm-up): "
          f"{full_epochs * (train_s + eval_s) / 3600:.2f} h (upper bound: warm-up epochs evaluate half as many candidates)")


if __name__ == "__main__":
    main()
