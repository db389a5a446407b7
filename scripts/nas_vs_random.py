"""Searched genotype against random genotypes of the same space, trained with the same short budget:
the baseline honest NAS papers report (Li & Talwalkar 2019; Yang et al. 2020, "NAS evaluation is
frustratingly hard").

    python scripts/nas_vs_random.py [--front <search run>/cars/pareto_front.json] [--member best_acc]
        [--data-dir data/cifar10_jpg_600] [--C 8] [--layers 5] [--epochs 10] [--seeds 0 1 2] [--random 5]
        [--gpu] [-- extra overrides for every training run]

Without `--front` a CARS search runs first (experiment=digits_cars, costs of the network trained
below; on `--data-dir` the same search on the image folder). Then the searched member is trained
once per seed, and `--random` genotypes drawn from the same DARTS space (`nas=random`, seeds
0..n-1, the searched genotype's node count) are trained once each with the first seed; every
training run has the same network size, recipe and epochs (`experiment=cifar_cars_train` with the
overrides printed below). Each run is a fresh `python train.py` process; its metrics.json gives
test/acc (of the best-by-val checkpoint). Prints every run, then the mean and standard deviation
(and range) of both groups, and writes them to `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from src.utils.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logger=none", "~callbacks.rich_progress_bar", "~callbacks.model_summary"]
DEVICE: list[str] = []  # ["trainer=gpu"] with --gpu


def data_overrides(data_dir: Path | None) -> list[str]:
    if data_dir is None:
        return ["data=digits"]
    return [
        "data=image_folder", f"data.data_dir={data_dir}", "data.image_size=32", "data.crop_pct=1.0",
        "data.in_memory=true", "data.mean=[0.4914,0.4822,0.4465]", "data.std=[0.2470,0.2435,0.2616]",
    ]


def net_overrides(C: int, layers: int, prefix: str = "model.net") -> list[str]:
    return [f"{prefix}.C={C}", f"{prefix}.layers={layers}"]


def train_overrides(args) -> list[str]:
    """The one recipe every compared genotype is trained with."""
    augmentation = "none" if args.data_dir is None else "standard"
    return [
        "experiment=cifar_cars_train", *data_overrides(args.data_dir), f"augmentation={augmentation}",
        *net_overrides(args.C, args.layers), "model.net.auxiliary=false", "model.aux_weight=0",
        "model.net.drop_path_prob=0", "callbacks=default", "data.batch_size=64", "optimizer.lr=0.05",
        f"trainer.max_epochs={args.epochs}", *QUIET, *DEVICE, *args.extra,
    ]


def run(overrides: list[str], log_dir: Path) -> tuple[dict, Path]:
    """One `train.py` run; its metrics and run directory."""
    from src.utils.train_subprocess import run_train

    return run_train(overrides, log_dir)


def params_m(genotype, args) -> float:
    from src.models.darts_net import NetworkCIFAR

    in_chans, classes = (1, 10) if args.data_dir is None else (3, 10)
    net = NetworkCIFAR(C=args.C, layers=args.layers, genotype=genotype, num_classes=classes, in_chans=in_chans)
    return sum(p.numel() for p in net.parameters()) / 1e6


def summary(accs: list[float]) -> str:
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{100 * statistics.mean(accs):.2f} +- {100 * spread:.2f} [{100 * min(accs):.2f}, {100 * max(accs):.2f}] (n={len(accs)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--front", type=Path, help="pareto_front.json of a CARS run (default: run a search first)")
    parser.add_argument("--member", default="best_acc", help="index, best_acc, smallest or fastest")
    parser.add_argument("--data-dir", type=Path, help="ImageFolder root (train/, test/); default: digits")
    parser.add_argument("--C", type=int, default=8, help="initial channels of every trained network")
    parser.add_argument("--layers", type=int, default=5, help="cells of every trained network")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the searched member")
    parser.add_argument("--random", type=int, default=5, help="number of random genotypes")
    parser.add_argument("--search-epochs", type=int, default=6)
    parser.add_argument("--gpu", action="store_true", help="run the search and every training on the GPU (trainer=gpu)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "nas_vs_random")
    parser.add_argument("extra", nargs="*", help="overrides added to every training run (after --)")
    args = parser.parse_args()
    if args.data_dir is not None:
        from src.datamodules.archive import ensure_split_folders

        args.data_dir = ensure_split_folders(args.data_dir)
    if args.gpu:
        DEVICE.append("trainer=gpu")

    from src.nas.front import load_front, pick_member
    from src.nas.genotypes import parse_genotype

    work = Path(tempfile.mkdtemp(prefix="nas_vs_random_"))
    start = time.perf_counter()
    if args.front is None:
        search = [
            "experiment=digits_cars", *data_overrides(args.data_dir), *net_overrides(args.C, args.layers, "model.cost_net"),
            f"trainer.max_epochs={args.search_epochs}", *QUIET, *DEVICE,
        ]
        print(f"search: python train.py {' '.join(search)}", flush=True)
        t0 = time.perf_counter()
        _, search_dir = run(search, work / "search")
        args.front = search_dir / "cars" / "pareto_front.json"
        print(f"search took {time.perf_counter() - t0:.0f} s; front: {args.front}", flush=True)
    row = pick_member(load_front(args.front), args.member, origin=str(args.front))
    searched = parse_genotype(row["member"])
    steps = len(searched.normal) // 2

    recipe = train_overrides(args)
    print(f"machine: {describe_machine()}")
    print(f"budget: every genotype trained with: python train.py {' '.join(recipe)}", flush=True)
    results = []
    for seed in args.seeds:
        metrics, _ = run([*recipe, f"model.net.front={args.front}", f"model.net.member={args.member}", f"seed={seed}"], work / "train")
        results.append({"group": "searched", "genotype": str(searched), "seed": seed, "params_m": params_m(searched, args),
                        "test_acc": metrics["test/acc"], "seconds": metrics["wall_time_s"]})
        print(f"searched  seed {seed}: test/acc {metrics['test/acc']:.4f}  ({results[-1]['params_m']:.3f} M params)", flush=True)
    from src.nas.evolution import random_genotype

    for k in range(args.random):
        genotype = random_genotype(k, steps=steps)
        metrics, _ = run([*recipe, "nas=random", f"nas.seed={k}", f"nas.steps={steps}", f"seed={args.seeds[0]}"], work / "train")
        results.append({"group": "random", "genotype": str(genotype), "seed": args.seeds[0], "nas_seed": k,
                        "params_m": params_m(genotype, args), "test_acc": metrics["test/acc"], "seconds": metrics["wall_time_s"]})
        print(f"random #{k} seed {args.seeds[0]}: test/acc {metrics['test/acc']:.4f}  ({results[-1]['params_m']:.3f} M params)", flush=True)

    groups = {g: [r["test_acc"] for r in results if r["group"] == g] for g in ("searched", "random")}
    print(f"\nsearched ({args.member} of {args.front}): {summary(groups['searched'])}")
    print(f"random genotypes, same space and budget:   {summary(groups['random'])}")
    better = sum(a >= statistics.mean(groups["searched"]) for a in groups["random"])
    print(f"{better} of {len(groups['random'])} random genotypes reach the searched mean; total {time.perf_counter() - start:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({
        "machine": describe_machine(), "command": " ".join(sys.argv), "recipe": recipe, "front": str(args.front),
        "member": args.member, "runs": results,
    }, indent=1) + "\n")
    print(f"written to {args.out / 'results.json'}")


if __name__ == "__main__":
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(main)()
