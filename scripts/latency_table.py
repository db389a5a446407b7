"""Build the per-op latency lookup table of a DARTS network on this machine and check how well it
predicts whole networks.

    python scripts/latency_table.py [--C 36] [--layers 20] [--image-size 32] [--device cpu]
        [--threads 1 2 4] [--check 10] [--repeats 50] [--out logs/latency_tables/]

For each thread count (CPU) or once (CUDA) it measures every (op, channels, stride, resolution) of the
network (`src.nas.latency_table.build_latency_table`, batch 1, median of `--repeats` calls after
warm-up), calibrates the fixed part on 3 random genotypes, saves the table as JSON (pass it to CARS
with `model.latency.table=<file>`), then measures `--check` other random genotypes whole and prints
predicted against measured latency: the rank correlation (Spearman) that a search's selection
depends on, and the mean absolute error in percent. Timing figures need a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from src.deploy.latency import measure_latency
from src.models.darts_net import NetworkCIFAR
from src.nas.evolution import DartsSpace
from src.nas.latency_table import build_latency_table
from src.utils.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--C", type=int, default=36)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--check", type=int, default=10, help="random genotypes measured whole")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "latency_tables")
    args = parser.parse_args()

    space = DartsSpace(steps=args.steps)
    net = partial(NetworkCIFAR, C=args.C, layers=args.layers, num_classes=args.num_classes, in_chans=args.in_chans)
    network = {"C": args.C, "layers": args.layers, "num_classes": args.num_classes, "in_chans": args.in_chans,
               "image_size": args.image_size, "steps": args.steps}
    rng = np.random.default_rng(args.seed)
    calibration = [space.sample(rng) for _ in range(3)]
    check = [space.sample(rng) for _ in range(args.check)]
    example = torch.randn(1, args.in_chans, args.image_size, args.image_size)
    print(f"machine: {describe_machine()}")
    print(f"network: NetworkCIFAR C={args.C} layers={args.layers} steps={args.steps} at {args.image_size} px, batch 1")
    for threads in args.threads if args.device == "cpu" else [None]:
        t0 = time.perf_counter()
        table = build_latency_table(
            net, space.ops, args.image_size, args.in_chans, device=args.device, threads=threads,
            warmup=args.warmup, repeats=args.repeats, calibration=calibration, network=network,
        )
        build_s = time.perf_counter() - t0
        name = f"darts_C{args.C}_L{args.layers}_r{args.image_size}_{args.device}" + (f"_t{threads}" if threads else "")
        path = table.save(args.out / f"{name}.json")
        predicted, measured = [], []
        t0 = time.perf_counter()
        for genotype in check:
            predicted.append(table.predict(genotype))
            measured.append(measure_latency(net(genotype=genotype), example, threads=threads, warmup=args.warmup,
                                            repeats=args.repeats, device=args.device).median_ms)
        measure_s = time.perf_counter() - t0
        predicted, measured = np.array(predicted), np.array(measured)
        rho = spearmanr(predicted, measured).statistic
        error = 100 * np.mean(np.abs(predicted - measured) / measured)
        label = f"{args.device}" + (f", {threads} threads" if threads else "")
        print(f"\n[{label}] table: {len(table.entries)} op shapes, base {table.base:.3f} ms, built in {build_s:.1f} s -> {path}")
        print("  genotype  predicted_ms  measured_ms")
        for i, (p, m) in enumerate(zip(predicted, measured)):
            print(f"  {i:8d}  {p:12.3f}  {m:11.3f}")
        print(f"  Spearman rho {rho:.3f}, mean |error| {error:.1f}%, measured range {measured.min():.2f}-{measured.max():.2f} ms; "
              f"measuring the {len(check)} networks whole took {measure_s:.1f} s, predicting them ~0 s")


if __name__ == "__main__":
    main()
