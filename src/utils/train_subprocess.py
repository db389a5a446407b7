"""One `python train.py ...` run in a child process, as the benchmark scripts (scripts/recipe_table.py,
distill_gain.py, nas_vs_random.py) run many: each run is exactly the command a user could repeat, and
its metrics come from the run directory's metrics.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from src.utils.errors import AutoclsError

ROOT = Path(__file__).resolve().parents[2]


def run_train(overrides: list[str], log_dir: Path) -> tuple[dict, Path]:
    """Run train.py with `overrides` under `log_dir`; returns its metrics.json (plus `seconds`, the wall
    time of the child) and its run directory.

    A failed run becomes one sentence: the child's own `Error: ...` line when it printed one (a user
    mistake such as a missing data folder, which every later run would repeat), else the exit code and
    a log file holding the child's stderr."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    before = set(log_dir.glob("train/runs/*"))
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={log_dir}", *overrides],
        cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, check=False,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        errors = [line[len("Error: "):] for line in result.stderr.splitlines() if line.startswith("Error: ")]
        if errors:
            raise AutoclsError(errors[-1])
        log = log_dir / "failed_train_run.log"
        log.write_text(f"python train.py paths.log_dir={log_dir} {' '.join(overrides)}\n\n{result.stderr}")
        raise AutoclsError(f"A train.py run exited with code {result.returncode}; its command and output are in {log}.")
    new_runs = sorted(set(log_dir.glob("train/runs/*")) - before)
    if not new_runs or not (new_runs[-1] / "metrics.json").is_file():
        raise AutoclsError(f"A train.py run under {log_dir} finished without writing metrics.json; rerun it by hand.")
    run_dir = new_runs[-1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["seconds"] = seconds
    return metrics, run_dir
