"""What each training trick buys: one base recipe and one variant per trick, equal epochs, several
seeds, written as a markdown table.

    python scripts/recipe_table.py --data-dir data/cifar10_jpg [--seeds 0 1] [--epochs 15]
        [--out docs/recipe_table.md] [--only base,ema] [-- extra overrides for every run]

`--data-dir` is an ImageFolder root with train/ and test/ (e.g. the shared CIFAR-10 JPEG copy
unpacked with scripts/unpack_archive.py; `--per-class N` there makes a CPU-sized subset). The
class-weight and sampling variants train on a long-tailed copy of train/ (imbalance ratio
`--imbalance`, as list files) and are compared with their own imbalanced base. Each run is a fresh
`python train.py` process; its metrics.json gives test/acc (of the best-by-val checkpoint).
Variants whose config is not in configs/ are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from src.datamodules.archive import ensure_split_folders
from src.utils.machine import describe_machine
from src.utils.train_subprocess import run_train

ROOT = Path(__file__).resolve().parents[1]

def variants(epochs: int) -> dict[str, list[str]]:
    """name -> overrides on top of the base recipe (balanced data). Schedules with epoch-based
    shapes are scaled to the run's length, so each decays over the same budget."""
    return {
        "base": [],
        "label smoothing 0.1": ["loss.label_smoothing=0.1"],
        "schedule: piecewise": ["scheduler=piecewise", f"scheduler.milestones=[{epochs // 2},{3 * epochs // 4}]"],
        "schedule: poly": ["scheduler=poly"],
        # 0.01 x the base lr at the end of the run
        "schedule: exponential": ["scheduler=exponential", f"scheduler.gamma={0.01 ** (1 / epochs):.4f}"],
        "schedule: one_cycle": ["scheduler=one_cycle"],
        "schedule: linear_to_zero": ["scheduler=linear_to_zero"],
        "SWA (averaging from 75% of the run)": ["callbacks=swa"],
        "EMA": ["callbacks=ema"],
        "focal loss": ["loss=focal"],
        "Mixup": ["augmentation=mixup"],
        "CutMix": ["augmentation=cutmix"],
    }


# name -> overrides on top of the base recipe trained on the long-tailed subset
IMBALANCED_VARIANTS = {
    "imbalanced: base": [],
    "imbalanced: class weights (balanced)": ["loss.class_weights=balanced"],
    "imbalanced: oversampling": ["data.sampler=oversample"],
    "imbalanced: focal loss": ["loss=focal"],
}


def data_overrides(data_dir: Path) -> list[str]:
    """The balanced data: CIFAR-sized images from an ImageFolder root, 10% of train for validation."""
    return [
        "data=image_folder", f"data.data_dir={data_dir}", "data.val_fraction=0.1", *CIFAR_DATA,
    ]


# normalisation and size shared by the balanced and the long-tailed data
CIFAR_DATA = [
    "data.image_size=32", "data.crop_pct=1.0", "data.mean=[0.4914,0.4822,0.4465]",
    "data.std=[0.2470,0.2435,0.2616]", "data.batch_size=128",
]


def recipe_overrides(epochs: int) -> list[str]:
    """A ResNet-20 CIFAR recipe, sized for short runs."""
    return [
        "model/net=resnet_cifar", "model.net.depth=20", "augmentation=standard", "optimizer=sgd",
        "optimizer.lr=0.1", "scheduler=cosine", f"trainer.max_epochs={epochs}", "logger=none",
        "~callbacks.rich_progress_bar", "~callbacks.model_summary",
    ]


def write_long_tailed_lists(data_dir: Path, out: Path, ratio: float) -> list[str]:
    """List files for train/ with class c keeping n * ratio^(-c/(C-1)) images (Cui et al. 2019's
    long-tailed CIFAR), test/ unchanged; returns the data overrides that use them."""
    classes = sorted(p.name for p in (data_dir / "train").iterdir() if p.is_dir())
    out.mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "test": []}
    for label, name in enumerate(classes):
        for split in lines:
            files = sorted((data_dir / split / name).iterdir())
            if split == "train":
                files = files[: max(1, round(len(files) * ratio ** (-label / (len(classes) - 1))))]
            lines[split] += [f"{split}/{name}/{f.name} {label}" for f in files]
    # validate on 10% of every class of the long-tailed train list, so the test set stays unseen
    train, val = [], []
    for label in range(len(classes)):
        own = [ln for ln in lines["train"] if ln.endswith(f" {label}")]
        k = max(1, len(own) // 10)
        val += own[:k]
        train += own[k:]
    for name, rows in (("train", train), ("val", val), ("test", lines["test"])):
        (out / f"{name}.txt").write_text("\n".join(rows) + "\n")
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return [
        "data=list_file", f"data.data_dir={data_dir}", f"data.train_list={out / 'train.txt'}",
        f"data.val_list={out / 'val.txt'}", f"data.test_list={out / 'test.txt'}",
        f"data.class_names_file={out / 'classes.txt'}", *CIFAR_DATA,
    ]


def config_exists(overrides: list[str]) -> bool:
    """Whether every `group=option` override names a config file that exists."""
    for o in overrides:
        key, _, value = o.partition("=")
        if "." not in key and not key.startswith(("~", "+")) and not (ROOT / "configs" / key / f"{value}.yaml").exists():
            return False
    return True


def run(overrides: list[str], log_dir: Path) -> tuple[float, float]:
    metrics, _ = run_train(overrides, log_dir)
    return metrics["test/acc"], metrics["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--imbalance", type=float, default=10.0, help="largest/smallest class size")
    parser.add_argument("--only", default="", help="comma-separated variant names to run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "recipe_table.md")
    parser.add_argument("--cache", type=Path, default=ROOT / "logs" / "recipe_table" / "results.jsonl",
                        help="finished runs (variant, seed, accuracy, seconds); a rerun skips them")
    parser.add_argument("extra", nargs="*", help="overrides added to every run (after --)")
    args = parser.parse_args()

    recipe = recipe_overrides(args.epochs) + args.extra
    data_dir = ensure_split_folders(args.data_dir)
    balanced = data_overrides(data_dir)
    work = Path(tempfile.mkdtemp(prefix="recipe_table_"))
    imbalanced = write_long_tailed_lists(data_dir, work / "lists", args.imbalance)
    jobs = [(name, balanced + recipe, o) for name, o in variants(args.epochs).items()]
    jobs += [(name, imbalanced + recipe, o) for name, o in IMBALANCED_VARIANTS.items()]
    if args.only:
        wanted = set(args.only.split(","))
        jobs = [job for job in jobs if job[0] in wanted]
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.cache.exists():
        for line in args.cache.read_text().splitlines():
            r = json.loads(line)
            done[(r["variant"], r["seed"])] = (r["acc"], r["seconds"])

    rows, skipped = [], []
    for name, base, extra in jobs:
        overrides = base + extra
        if not config_exists(overrides):
            skipped.append(name)
            print(f"skip {name}: its config is not in configs/", flush=True)
            continue
        accs, times = [], []
        for seed in args.seeds:
            if (name, seed) not in done:
                done[(name, seed)] = run([*overrides, f"seed={seed}"], work / "logs")
                with args.cache.open("a") as f:
                    acc, seconds = done[(name, seed)]
                    f.write(json.dumps({"variant": name, "seed": seed, "acc": acc, "seconds": seconds}) + "\n")
            acc, seconds = done[(name, seed)]
            accs.append(acc)
            times.append(seconds)
            print(f"{name} seed {seed}: test/acc {acc:.4f} ({seconds:.0f} s)", flush=True)
        rows.append((name, extra, accs, times))

    base_mean = {n: statistics.mean(a) for n, _, a, _ in rows}
    lines = [
        "# What each training trick buys",
        "",
        f"Machine: {describe_machine()}.  ",
        (f"Command: `python scripts/recipe_table.py --data-dir {args.data_dir} --seeds {' '.join(map(str, args.seeds))} "
         f"--epochs {args.epochs}{' -- ' + ' '.join(args.extra) if args.extra else ''}`.  "),
        (f"Base recipe: `{' '.join(balanced + recipe)}`; {args.epochs} epochs for every row, seeds {args.seeds}; "
         f"top-1 is test/acc of the best-by-val checkpoint, mean and [min, max] over seeds; "
         f"imbalanced rows train on a long-tailed train split (ratio {args.imbalance:g}) and compare with "
         "their own base."),
        "",
        "| variant | overrides | top-1 mean [min, max] | vs base | time per run (s) |",
        "|---|---|---|---|---|",
    ]
    for name, extra, accs, times in rows:
        ref = base_mean.get("imbalanced: base" if name.startswith("imbalanced") else "base")
        delta = f"{100 * (statistics.mean(accs) - ref):+.2f}" if ref is not None else "n/a"
        lines.append(f"| {name} | `{' '.join(extra) or '-'}` | {100 * statistics.mean(accs):.2f} "
                     f"[{100 * min(accs):.2f}, {100 * max(accs):.2f}] | {delta} | {statistics.mean(times):.0f} |")
    if skipped:
        lines += ["", f"Not run (config not available yet): {', '.join(skipped)}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(main)()
