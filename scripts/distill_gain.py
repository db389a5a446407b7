"""What distillation buys: a student trained (a) from the labels alone and (b) from a stronger teacher
(SSLD or KD), equal epochs, several seeds; prints mean, spread and the gain in top-1.

    # the issue's benchmark (GPU): CIFAR-100, ResNet-56 teacher -> ResNet-20 student, SSLD
    python scripts/distill_gain.py --data cifar100 --teacher-epochs 160 --epochs 160 -- trainer=gpu
    # a CPU-sized pair: an ImageFolder copy of CIFAR-10 at 32x32
    python scripts/distill_gain.py --data-dir data/cifar10_jpg_600 --teacher-epochs 15 --epochs 8 --method kd

The teacher (ResNet-`--teacher-depth`) is trained once with the student's recipe for
`--teacher-epochs` (or given with `--teacher-ckpt`); then for every seed the student
(ResNet-`--student-depth`) trains for `--epochs` as a classifier (a) and with `model=distillation`
(b). `--method ssld`: PaddleClas's SSLD loss (`sym_kl`, the mean of both KL directions, which
PaddleClas calls JS divergence), labels unused (alpha 1, T 1), as `experiment=cifar100_ssld`;
`--method ssld_js`: the same with the textbook Jensen-Shannon divergence; `--method kd`: T^2 KL at T 4 mixed 0.9 / 0.1 with cross-entropy, as
`experiment=cifar100_kd`. `--unlabeled-dir` mixes extra images without labels into (b)'s batches.
Each run is a fresh `python train.py`; top-1 is test/acc of its best-by-val checkpoint. Finished runs
are cached in `--cache`, so a rerun (or a longer one) skips them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
from pathlib import Path

from src.datamodules.archive import ensure_split_folders
from src.utils.machine import describe_machine
from src.utils.train_subprocess import run_train

ROOT = Path(__file__).resolve().parents[1]

METHODS = {
    # experiment=cifar100_ssld: PaddleClas's SSLD loss (sym_kl), labels unused, no label smoothing
    "ssld": ["model.distillation.divergence=sym_kl", "model.distillation.temperature=1.0", "model.distillation.alpha=1.0",
             "loss.label_smoothing=0.0"],
    # the same with the textbook Jensen-Shannon divergence, for comparison
    "ssld_js": ["model.distillation.divergence=js", "model.distillation.temperature=1.0", "model.distillation.alpha=1.0",
                "loss.label_smoothing=0.0"],
    "kd": ["model.distillation.divergence=kl", "model.distillation.temperature=4.0", "model.distillation.alpha=0.9"],
}


def data_overrides(args) -> list[str]:
    if args.data_dir is None:
        return [f"data={args.data}"]
    # CIFAR-sized images from an ImageFolder root (train/ and test/), 10% of train validates
    return [
        "data=image_folder", f"data.data_dir={args.data_dir.resolve()}", "data.val_fraction=0.1",
        "data.image_size=32", "data.crop_pct=1.0", "data.mean=[0.4914,0.4822,0.4465]",
        "data.std=[0.2470,0.2435,0.2616]", "data.batch_size=128",
    ]


def recipe(depth: int, epochs: int) -> list[str]:
    """The CIFAR ResNet recipe of experiment=cifar100_resnet56, at `depth` for `epochs`."""
    return [
        "model/net=resnet_cifar", f"model.net.depth={depth}", "augmentation=standard", "optimizer=sgd",
        "optimizer.lr=0.1", "scheduler=cosine", f"trainer.max_epochs={epochs}", "logger=none",
        "~callbacks.rich_progress_bar", "~callbacks.model_summary",
    ]


def run(overrides: list[str], log_dir: Path) -> dict:
    """One `python train.py` run; returns its metrics.json plus the wall time."""
    return run_train(overrides, log_dir)[0]


def cached_run(key: dict, overrides: list[str], log_dir: Path, cache: Path) -> dict:
    """`run`, or its earlier result for the same overrides from the cache file."""
    digest = hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:12]
    if cache.exists():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            if row["digest"] == digest and Path(row["metrics"].get("best_ckpt", "")).exists():
                return row["metrics"]
    metrics = run(overrides, log_dir)
    with cache.open("a") as f:
        f.write(json.dumps({**key, "digest": digest, "overrides": overrides, "metrics": metrics}) + "\n")
    return metrics


def summary(accs: list[float]) -> str:
    spread = f" [{100 * min(accs):.2f}, {100 * max(accs):.2f}]" if len(accs) > 1 else ""
    return f"{100 * statistics.mean(accs):.2f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="cifar100", help="a data config (used when --data-dir is not given)")
    parser.add_argument("--data-dir", type=Path, default=None, help="an ImageFolder root with train/ and test/")
    parser.add_argument("--method", choices=sorted(METHODS), default="ssld")
    parser.add_argument("--teacher-depth", type=int, default=56)
    parser.add_argument("--student-depth", type=int, default=20)
    parser.add_argument("--teacher-epochs", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=160, help="epochs of every student run, (a) and (b) alike")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--teacher-ckpt", type=Path, default=None, help="skip training the teacher")
    parser.add_argument("--unlabeled-dir", type=Path, default=None, help="extra images without labels for (b)")
    parser.add_argument("--unlabeled-ratio", type=float, default=1.0)
    parser.add_argument("--cache", type=Path, default=ROOT / "logs" / "distill_gain" / "results.jsonl")
    parser.add_argument("extra", nargs="*", help="overrides added to every run (after --), e.g. trainer=gpu")
    args = parser.parse_args()
    if args.data_dir is not None:
        ensure_split_folders(args.data_dir, ("train",))

    args.cache.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="distill_gain_", dir=args.cache.parent))
    data = data_overrides(args)

    teacher_ckpt, teacher_acc = args.teacher_ckpt, None
    if teacher_ckpt is None:
        overrides = [*data, *recipe(args.teacher_depth, args.teacher_epochs), "seed=0", *args.extra]
        metrics = cached_run({"run": "teacher"}, overrides, log_dir, args.cache)
        teacher_ckpt, teacher_acc = Path(metrics["best_ckpt"]), metrics["test/acc"]
        print(f"teacher ResNet-{args.teacher_depth}, {args.teacher_epochs} epochs: test/acc {teacher_acc:.4f} "
              f"({metrics['seconds']:.0f} s)", flush=True)

    student = [*data, *recipe(args.student_depth, args.epochs)]
    distil = ["model=distillation", f"model.teacher_ckpt={teacher_ckpt.resolve()}", *METHODS[args.method]]
    if args.unlabeled_dir is not None:
        distil += ["+data/unlabeled=folder", f"data.unlabeled.data_dir={args.unlabeled_dir.resolve()}",
                   f"data.unlabeled.ratio={args.unlabeled_ratio}"]
    arms = {"(a) labels only": student, f"(b) {args.method.upper()} from the teacher": [*student, *distil]}
    accs: dict[str, list[float]] = {name: [] for name in arms}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for seed in args.seeds:
        for name, overrides in arms.items():
            metrics = cached_run({"run": name, "seed": seed}, [*overrides, f"seed={seed}", *args.extra], log_dir, args.cache)
            accs[name].append(metrics["test/acc"])
            times[name].append(metrics["seconds"])
            print(f"{name}, seed {seed}: test/acc {metrics['test/acc']:.4f} ({metrics['seconds']:.0f} s)", flush=True)

    (a, b) = arms
    gain = 100 * (statistics.mean(accs[b]) - statistics.mean(accs[a]))
    source = args.data_dir if args.data_dir is not None else f"data={args.data}"
    print()
    print(f"Machine: {describe_machine()}")
    print(f"Data: {source}; teacher ResNet-{args.teacher_depth}"
          + (f" ({args.teacher_epochs} epochs, test/acc {100 * teacher_acc:.2f})" if teacher_acc is not None else f" ({teacher_ckpt})")
          + f"; student ResNet-{args.student_depth}, {args.epochs} epochs; seeds {args.seeds}")
    print("| student | top-1 mean [min, max] | time per run (s) |")
    print("|---|---|---|")
    for name in arms:
        print(f"| {name} | {summary(accs[name])} | {statistics.mean(times[name]):.0f} |")
    print(f"Gain of (b) over (a): {gain:+.2f} points top-1 (goal: >= +1.00)")


if __name__ == "__main__":
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(main)()
