"""Grid search vs TPE vs ASHA vs BOHB on PaddleClas' transfer-learning space, on one fixed-budget task:
the best accuracy each finds and the compute it used (trials, summed training epochs).

    python scripts/hpo_efficiency.py --data-dir data/cifar10_jpg_600 --gpu
    python scripts/hpo_efficiency.py --data-dir data/cifar10_jpg_600 --smoke      # a CPU smoke test

The task (offline, no downloaded weights): split the ImageFolder's classes in two halves. A timm ResNet-18
is pre-trained once on the first half (source), then every trial fine-tunes it on the second half
(target: `--target-per-class` training images per class, 40% of them held out for validation) for
`--epochs` epochs at 32x32 pixels, over the space of configs/hparams_search/transfer_grid.yaml (lr x weight decay x label smoothing x Mixup alpha: 108 points)
and its continuous version transfer_tpe.yaml. The methods:

    grid   every grid point, full budget                         (hparams_search=transfer_grid)
    tpe    --tpe-trials TPE trials, full budget                   (hparams_search=transfer_tpe)
    asha   --asha-trials random trials, successive halving (eta 3) on val/acc after 1, 3, 9... epochs
    bohb   --bohb-trials TPE trials with Hyperband (eta 3)        (BOHB as TPE + Hyperband)

Each is an ordinary sweep under `<work dir>/logs/train/hpo/transfer_<method>/`, so an interrupted run
resumes where it stopped (rerun the same command; `--methods grid` runs one at a time, e.g. to keep each
call under a time limit). The table reports the best trial's val/acc_best (the objective) and its test/acc,
the trials and summed epochs against grid's, and names the machine. Goals (issue 9): TPE within 0.4 point
of grid's best with <= 1/10 of its trials; ASHA/BOHB within 0.4 point with <= 1/10 of its summed epochs.

One live run of a randomised method is one draw. Once the grid is complete, a second table replays
random search, TPE, ASHA and BOHB `--replay-seeds` times each on the grid's recorded learning curves
(src/hpo/tabular_replay.py: the same samplers and pruners, the grid's points as an ordinal space) and
reports the distribution of their gaps to grid's best and their compute.

The lr axis of both spaces is flowers102_finetune's (SGD, batch 32, lr 0.0125 from ImageNet weights);
a task whose best lr lies elsewhere leaves the optimum on the grid's edge, where no method can beat grid
search by sampling. `--lr-scale` moves the axis: find the task's best lr first with a few full trials
(see docs/hpo.md, "Efficiency figure").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.utils.machine import describe_machine

METHODS = ("grid", "tpe", "asha", "bohb")
# the goal: within 0.4 point of grid search's best
TOLERANCE = 0.4


def split_classes(data_dir: Path, work: Path, per_class: int) -> tuple[Path, Path]:
    """Symlinked ImageFolder copies: source = first half of the classes (all images), target = second
    half with `per_class` training images per class (all its test images)."""
    classes = sorted(p.name for p in (data_dir / "train").iterdir() if p.is_dir())
    half = len(classes) // 2
    roots = {"source": (classes[:half], None), "target": (classes[half:], per_class)}
    for name, (names, limit) in roots.items():
        for split in ("train", "test"):
            for cls in names:
                out = work / name / split / cls
                if out.is_dir():
                    continue
                out.mkdir(parents=True)
                files = sorted((data_dir / split / cls).iterdir())
                if split == "train" and limit:
                    files = files[:limit]
                for f in files:
                    (out / f.name).symlink_to(f.resolve())
    return work / "source", work / "target"


def data_overrides(root: Path, batch_size: int) -> list[str]:
    # 40% of the training images validate: with 300 per class that is 600 images (0.17 point each)
    return ["data=image_folder", f"data.data_dir={root}", "data.image_size=32", "data.crop_pct=1.0",
            "data.num_classes=null", "data.val_fraction=0.4", "augmentation=standard", f"data.batch_size={batch_size}"]


def lr_space(method: str, scale: float) -> str:
    """The lr axis of configs/hparams_search/transfer_grid.yaml moved by `scale` (same shape: its points,
    or the log interval they span), for a task whose best lr lies elsewhere than flowers102_finetune's."""
    from omegaconf import OmegaConf

    from src.hpo.search_space import parse_search_space

    params = OmegaConf.load(ROOT / "configs/hparams_search/transfer_grid.yaml").hydra.sweeper.params
    lrs = [f"{lr * scale:g}" for lr in sorted(parse_search_space(params).grid()["optimizer.lr"])]
    if method == "grid":
        return f"optimizer.lr=choice({','.join(lrs)})"
    return f"optimizer.lr=tag(log,interval({lrs[0]},{lrs[-1]}))"


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        result = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False,
                                env={**os.environ, "WANDB_MODE": "disabled"})
    if result.returncode != 0:
        sys.exit(f"command failed (exit {result.returncode}); see {log}")


def pretrain(source: Path, work: Path, args) -> Path:
    """The source network, once: trained on the source classes, saved as a plain state dict."""
    weights = work / "source_resnet18.pth"
    if weights.is_file():
        return weights
    run_dir = work / "pretrain"
    run([sys.executable, "train.py", *data_overrides(source, 128), "model/net=timm", "model.net.model_name=resnet18",
         "optimizer=sgd", "optimizer.lr=0.2", f"trainer.max_epochs={args.pretrain_epochs}", "logger=none",
         f"hydra.run.dir={run_dir}", *args.trainer], work / "pretrain.log")
    import torch

    from src.deploy.trained_net import load_trained_net

    ckpt = json.loads((run_dir / "metrics.json").read_text())["best_ckpt"]
    torch.save(load_trained_net(ckpt).net.state_dict(), weights)
    return weights


def sweep_overrides(method: str, args) -> list[str]:
    search = "transfer_grid" if method == "grid" else "transfer_tpe"
    # the table needs each trial's metrics only: keep the best trial's checkpoints, not ~150 MB per trial
    common = [f"hparams_search={search}", f"hydra.sweeper.study_name=transfer_{method}",
              "hydra.sweeper.keep_checkpoints=best"]
    if args.lr_scale != 1:
        common.append(lr_space(method, args.lr_scale))
    if method == "tpe":
        return [*common, f"hydra.sweeper.n_trials={args.tpe_trials}"]
    if method == "asha":
        return [*common, "hydra/sweeper/sampler=random", "hydra/sweeper/pruner=asha",
                f"hydra.sweeper.n_trials={args.asha_trials}"]
    if method == "bohb":
        return [*common, "hydra/sweeper/pruner=hyperband", f"hydra.sweeper.pruner.max_resource={args.epochs}",
                f"hydra.sweeper.n_trials={args.bohb_trials}"]
    return common


def summarise(sweep_dir: Path) -> dict:
    with open(sweep_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = max(complete, key=lambda r: float(r["val/acc_best"]))
    metrics = json.loads((Path(best["run_dir"]) / "metrics.json").read_text())
    return {"trials": len(rows), "pruned": sum(r["state"] == "PRUNED" for r in rows),
            "epochs": sum(int(r["epochs"] or 0) for r in rows), "val": float(best["val/acc_best"]),
            "test": metrics.get("test/acc"), "best_trial": int(best["number"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "cifar10_jpg_600")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "logs" / "hpo_efficiency")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=9, help="fine-tuning epochs of a full trial")
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--target-per-class", type=int, default=600, help="target training images per class")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="fine-tuning batch (32: the batch flowers102_finetune's lr is set for)")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiplies the lr axis of both spaces (centre it on the task's best lr)")
    parser.add_argument("--tpe-trials", type=int, default=10)
    parser.add_argument("--asha-trials", type=int, default=25)
    parser.add_argument("--bohb-trials", type=int, default=20)
    parser.add_argument("--replay-seeds", type=int, default=50,
                        help="seeds per method replayed on the finished grid's curves (0: no replay)")
    parser.add_argument("--gpu", action="store_true", help="trainer=gpu for every run")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke test: 1 epoch, 2x2 grid, 2-3 trials per method")
    parser.add_argument("extra", nargs="*", help="overrides for every fine-tuning run")
    args = parser.parse_args()
    args.trainer = ["trainer=gpu"] if args.gpu else ["trainer=cpu"]
    extra = list(args.extra)
    if args.smoke:
        args.epochs, args.pretrain_epochs, args.target_per_class = 2, 1, 10
        args.tpe_trials = args.asha_trials = args.bohb_trials = 2
        # a 2x2 grid: two dimensions swept, the others fixed
        extra += ["optimizer.lr=choice(0.00625,0.0125)", "optimizer.weight_decay=choice(1e-5,1e-4)",
                  "loss.label_smoothing=0.1", "augmentation.mixing.mixup.alpha=0.2"]
        args.trainer += ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
                         "+trainer.limit_test_batches=2"]

    from src.datamodules.archive import ensure_split_folders

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    source, target = split_classes(ensure_split_folders(args.data_dir), work, args.target_per_class)
    weights = pretrain(source, work, args)
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        run([sys.executable, "train.py", "-m", *sweep_overrides(method, args), *data_overrides(target, args.batch_size),
             "model/net=timm", "model.net.model_name=resnet18", f"model.net.pretrained_file={weights}",
             f"trainer.max_epochs={args.epochs}", f"paths.log_dir={work / 'logs'}", *args.trainer, *extra],
            work / f"{method}.log")

    results = {m: summarise(work / "logs" / "train" / "hpo" / f"transfer_{m}") for m in METHODS
               if (work / "logs" / "train" / "hpo" / f"transfer_{m}" / "trials.csv").is_file()}
    print(f"\nTransfer HPO efficiency on {describe_machine()}")
    classes = [sorted(p.name for p in (root / "train").iterdir()) for root in (source, target)]
    print(f"task: ResNet-18 pre-trained {args.pretrain_epochs} epochs on {', '.join(classes[0])}; fine-tuned "
          f"{args.epochs} epochs on {', '.join(classes[1])} ({args.target_per_class} train images/class, 40% of "
          f"them for validation; {args.data_dir.name}, 32 px)\n")
    grid = results.get("grid")
    print("| method | best val/acc_best | its test/acc | trials (vs grid) | pruned | summed epochs (vs grid) |")
    print("|---|---|---|---|---|---|")
    for m, r in results.items():
        rel_t = f" ({r['trials'] / grid['trials']:.2f})" if grid else ""
        rel_e = f" ({r['epochs'] / grid['epochs']:.2f})" if grid else ""
        delta = f" ({100 * (r['val'] - grid['val']):+.2f} pt)" if grid and m != "grid" else ""
        test = f"{r['test']:.4f}" if r["test"] is not None else "-"
        print(f"| {m} | {r['val']:.4f}{delta} | {test} | {r['trials']}{rel_t} | {r['pruned']} | {r['epochs']}{rel_e} |")
    replayed = {}
    grid_dir = work / "logs" / "train" / "hpo" / "transfer_grid"
    if grid and args.replay_seeds:
        replayed = replay_on_grid(grid_dir, args)
    (work / "hpo_efficiency.json").write_text(json.dumps(
        {"machine": describe_machine(), "results": results, "replayed_on_grid": replayed}, indent=2))


def replay_on_grid(grid_dir: Path, args) -> dict:
    """Each method's distribution over seeds, replayed on the grid's recorded learning curves with the
    sampler and pruner settings of the live sweeps (src/hpo/tabular_replay.py)."""
    import optuna
    from hydra.core.config_store import ConfigStore
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import hydra_plugins.autocls_optuna_sweeper.optuna_sweeper  # noqa: F401  registers sampler/pruner configs
    from src.hpo.storage import open_storage
    from src.hpo.tabular_replay import load_grid_table, replay_many, summarise_replays

    try:
        table = load_grid_table(open_storage(str(grid_dir / "optuna.journal")), "transfer_grid")
    except ValueError as err:  # an unfinished grid: the live table stands alone
        print(f"\nNo replay: {err}.")
        return {}
    tpe_startup = OmegaConf.load(ROOT / "configs/hparams_search/transfer_tpe.yaml").hydra.sweeper.sampler.n_startup_trials

    def build(group: str, name: str, **kwargs):
        return instantiate(ConfigStore.instance().load(f"hydra/sweeper/{group}/{name}.yaml").node, **kwargs)

    methods = {
        "random": lambda seed: (build("sampler", "random", seed=seed), optuna.pruners.NopPruner(), args.tpe_trials),
        "tpe": lambda seed: (build("sampler", "tpe", seed=seed, n_startup_trials=tpe_startup),
                             optuna.pruners.NopPruner(), args.tpe_trials),
        "asha": lambda seed: (build("sampler", "random", seed=seed), build("pruner", "asha"), args.asha_trials),
        "bohb": lambda seed: (build("sampler", "tpe", seed=seed, n_startup_trials=tpe_startup),
                              build("pruner", "hyperband", max_resource=table.max_epochs), args.bohb_trials),
    }
    seeds = list(range(args.replay_seeds))
    summaries = {m: summarise_replays(table, rs, TOLERANCE) for m, rs in replay_many(table, methods, seeds).items()}
    best = table.best
    print(f"\nReplayed on the grid's recorded curves ({len(table.points)} points, best val {best.best:.4f}, "
          f"its test {best.test:.4f}), {len(seeds)} seeds per method, the space as the grid's ordinal indices:\n")
    print(f"| method | val gap to grid best, mean / median / worst (pt) | seeds within {TOLERANCE} pt | "
          "test gap, mean (pt) | trials (vs grid) | summed epochs (vs grid) |")
    print("|---|---|---|---|---|---|")
    for m, r in summaries.items():
        test = f"{r['test_gap_mean']:.2f}" if "test_gap_mean" in r else "-"
        print(f"| {m} | {r['val_gap_mean']:.2f} / {r['val_gap_median']:.2f} / {r['val_gap_worst']:.2f} | "
              f"{100 * r['within_tolerance']:.0f}% | {test} | {r['trials_mean']:.1f} ({r['trials_vs_grid']:.2f}) | "
              f"{r['epochs_mean']:.1f} ({r['epochs_vs_grid']:.2f}) |")
    return summaries


if __name__ == "__main__":
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(main)()
