"""Time the README's second set-up command, `python train.py`, end to end (interpreter start, imports,
data, 15 epochs, test) and report its accuracy.

    python scripts/bench_default_run.py [--repeats 3] [extra overrides ...]

Each repeat is a fresh process writing into a temporary log dir; the table gives wall time and the
metrics from the run's metrics.json, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from src.utils.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to train.py")
    args = parser.parse_args()

    rows = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as logs:
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={logs}", *args.overrides],
                check=True, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            wall = time.perf_counter() - start
            metrics = json.loads(next(Path(logs).glob("train/runs/*/metrics.json")).read_text())
        rows.append((wall, metrics["val/acc"], metrics["val/acc_best"], metrics["test/acc"]))
        print(f"run {i + 1}: {wall:.1f} s wall, val/acc {rows[-1][1]:.4f}, val/acc_best {rows[-1][2]:.4f}, "
              f"test/acc {rows[-1][3]:.4f}", flush=True)

    walls = [r[0] for r in rows]
    print(f"\nmachine: {describe_machine()}")
    print(f"command: python train.py {' '.join(args.overrides)}".rstrip())
    print("| wall time (s), median [min, max] | val/acc | val/acc_best | test/acc |")
    print("|---|---|---|---|")
    print(f"| {statistics.median(walls):.1f} [{min(walls):.1f}, {max(walls):.1f}] | {rows[0][1]:.4f} | "
          f"{rows[0][2]:.4f} | {rows[0][3]:.4f} |")


if __name__ == "__main__":
    main()
