"""Plot the learning rate against the optimizer step, as a run with these overrides would use it.

    python scripts/plot_schedule.py scheduler=one_cycle [scheduler.pct_start=0.25] [trainer.max_epochs=30]
    python scripts/plot_schedule.py --all [--steps-per-epoch 100] [--out schedules.png] [overrides ...]

Composes configs/train.yaml with the overrides, builds the configured optimizer and schedule the way
`ClassifierLitModule.configure_optimizers` does, on a tiny linear model (so `optimizer.lr_mult_list`
does not apply) with `--steps-per-epoch` steps per epoch for `trainer.max_epochs` epochs, and writes a
PNG whose path it prints. `--all` draws every configs/scheduler/*.yaml into one figure. The plotted
lr is the head's (multiplier 1), after `optimizer.scale_lr` with the data batch size on one device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `src` without an installed package

from src.utils.task import user_errors_as_messages


def lr_curve_for(overrides: list[str], steps_per_epoch: int) -> list[float]:
    """Compose the training config with `overrides` and return the lr of every step of the run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from torch import nn

    from src.optim.schedulers import lr_curve

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
    total_steps = cfg.trainer.max_epochs * steps_per_epoch
    optimizer = instantiate(cfg.optimizer)(nn.Linear(4, 2), global_batch_size=cfg.data.batch_size)
    scheduler = None
    if cfg.get("scheduler") is not None:
        scheduler = instantiate(cfg.scheduler)(
            optimizer=optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch
        )
    return lr_curve(optimizer, scheduler, total_steps)


def plot(curves: dict[str, list[float]], steps_per_epoch: int, out: Path) -> Path:
    """One panel per curve (four per row), lr against step, saved as a PNG at `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, lrs) in zip(axes.flat, curves.items()):
        ax.plot(range(len(lrs)), lrs)
        ax.set(title=name, xlabel=f"step ({steps_per_epoch} per epoch)", ylabel="lr")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--all", action="store_true", help="every configs/scheduler/*.yaml in one figure")
    parser.add_argument("--out", type=Path, help="PNG path (default: lr_schedule.png, lr_schedules.png with --all)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    args = parser.parse_args(argv)

    if args.all:
        names = sorted(p.stem for p in (ROOT / "configs" / "scheduler").glob("*.yaml"))
        curves = {name: lr_curve_for([*args.overrides, f"scheduler={name}"], args.steps_per_epoch)
                  for name in names}
    else:
        label = " ".join(args.overrides) or "default"
        curves = {label: lr_curve_for(args.overrides, args.steps_per_epoch)}
    default_name = "lr_schedules.png" if args.all else "lr_schedule.png"
    out = plot(curves, args.steps_per_epoch, args.out or Path(default_name))
    print(out.resolve())
    return out


if __name__ == "__main__":
    user_errors_as_messages(main)()
