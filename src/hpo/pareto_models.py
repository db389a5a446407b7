"""The Pareto front of a sweep as a table of deployable models: `pareto_models.csv` in the sweep dir.

`optimization_results.yaml` lists the non-dominated trials (Optuna's `study.best_trials`) with their
params and run dirs. A user picking one to deploy needs more: the model file the trial exported and
timed (`export/latency.json` -> `deployed.model`: `model.int8.onnx` for an INT8 trial), its size, its
test accuracy (when the trials tested) and the checkpoint it was exported from. One row per front
member, sorted by the first objective:

    number, <objectives>, params/<name>..., target, model, deploy/params_m, deploy/mflops, test/acc,
    checkpoint, run_dir

Written at the end of a sweep by the Hydra callback `ParetoModels` (listed under `hydra.callbacks` of a
search config), or by `write_pareto_models(sweep_dir)` for a sweep that has already run. A single-objective
sweep gets its best trial as the only row.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src.hpo.report import RESULTS_YAML

log = logging.getLogger(__name__)

PARETO_MODELS_CSV = "pareto_models.csv"
_RUN_METRICS = ("deploy/params_m", "deploy/mflops", "test/acc")


def write_pareto_models(sweep_dir: str | Path) -> Path:
    """`<sweep_dir>/pareto_models.csv` from the sweep's optimization_results.yaml and its trials' run dirs."""
    sweep_dir = Path(sweep_dir)
    results = yaml.safe_load((sweep_dir / RESULTS_YAML).read_text())
    objectives = list(results["objectives"])
    front = results.get("pareto_front")
    if front is None and "best_trial" in results:
        front = [{"number": results["best_trial"], "values": {objectives[0]: results["best_value"]},
                  "params": results["best_params"], "run_dir": results.get("best_run_dir")}]
    front = front or []
    param_names = sorted({name for entry in front for name in entry["params"]})
    header = ["number", *objectives, *[f"params/{p}" for p in param_names], "target", "model", *_RUN_METRICS,
              "checkpoint", "run_dir"]
    rows = []
    for entry in front:
        run_dir = Path(str(entry.get("run_dir") or ""))
        metrics = _read_json(run_dir / "metrics.json")
        export = _read_json(run_dir / "export" / "latency.json")
        deployed = export.get("deployed") or {}
        rows.append([entry["number"], *[entry["values"].get(o) for o in objectives],
                     *[entry["params"].get(p) for p in param_names], deployed.get("target"), deployed.get("model"),
                     *[metrics.get(k) for k in _RUN_METRICS], export.get("checkpoint"), str(run_dir)])
    path = sweep_dir / PARETO_MODELS_CSV
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a trial that failed before writing it
        return {}


class ParetoModels(Callback):
    """Hydra callback: writes pareto_models.csv when the multirun ends and logs the front."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not (sweep_dir / RESULTS_YAML).is_file():
            log.warning(f"No {RESULTS_YAML} in {sweep_dir}; {PARETO_MODELS_CSV} not written.")
            return
        path = write_pareto_models(sweep_dir)
        objectives = yaml.safe_load((sweep_dir / RESULTS_YAML).read_text())["objectives"]
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        log.info(f"Pareto front: {len(rows)} models in {path}")
        for row in rows:
            values = ", ".join(f"{name}={float(row[name]):.4g}" for name in objectives)
            log.info(f"  trial {row['number']}: {values}  {row['model'] or row['run_dir']}")
