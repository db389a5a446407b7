"""The kinds of pipeline step, one per way a user runs this project by hand:

    train  python train.py <overrides> hydra.run.dir=<step dir>                  a training or search run
    sweep  python train.py -m <overrides> hydra.sweep.dir=<step dir>             an hparams_search sweep
    pba    python scripts/pba_search.py --out <step dir> --<arg> <value> ... -- <overrides>   a PBA search

Each kind knows its command, how a killed run of it continues, and what a finished run leaves for the
steps after it: its *outputs* (`${steps.<step>.<output>}` in their overrides) and its *result* (the
headline metric the report compares). The kinds are the project's three command forms rather than
components, so a step names one with `kind:` instead of a `_target_`.
"""

from __future__ import annotations

import csv
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from src.utils.errors import AutoclsError

if TYPE_CHECKING:
    from src.pipeline.steps import Step

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Outcome:
    """What a finished step leaves: `outputs` for later steps' interpolations, `result` for the report
    (`metric`, `value` and, where the run tested, `test/acc`)."""

    outputs: dict[str, Any]
    result: dict[str, Any]


class StepKind:
    name: ClassVar[str]
    # the outputs every step of the kind gives (besides those its `outputs:` declares), for the docs
    outputs: ClassVar[tuple[str, ...]]
    takes_args: ClassVar[bool] = False

    def command(self, step: Step, overrides: list[str]) -> list[str]:
        raise NotImplementedError

    def resume_arguments(self, step: Step) -> list[str]:
        """Arguments that make a rerun continue a killed run (nothing where the run resumes by itself)."""
        return []

    def planned_outputs(self, step: Step) -> dict[str, Any]:
        """The outputs before the step has run: real paths where they are known in advance, empty
        values otherwise. Later steps' overrides are checked against them before anything runs."""
        raise NotImplementedError

    def collect(self, step: Step) -> Outcome:
        raise NotImplementedError

    def train_overrides(self, overrides: list[str]) -> list[str]:
        """The train.py overrides inside this kind's command: what must compose with configs/train.yaml."""
        return list(overrides)


class TrainRun(StepKind):
    """One `python train.py` run in the step directory: training, or a DARTS/CARS search (a search's
    files, e.g. genotype.json, are declared under the step's `outputs:`)."""

    name = "train"
    outputs = ("dir", "metrics", "ckpt")

    def command(self, step: Step, overrides: list[str]) -> list[str]:
        return [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={step.dir}"]

    def resume_arguments(self, step: Step) -> list[str]:
        # a run killed after an epoch continues from it, as `python train.py ckpt_path=...` does by hand
        last = step.dir / "checkpoints" / "last.ckpt"
        return [f"ckpt_path={last}"] if last.is_file() else []

    def planned_outputs(self, step: Step) -> dict[str, Any]:
        return {"dir": str(step.dir), "metrics": {}, "ckpt": str(step.dir / "checkpoints" / "last.ckpt")}

    def collect(self, step: Step) -> Outcome:
        metrics = _read_metrics(step, step.dir / "metrics.json")
        metric = step.metric or "val/acc_best"
        if metric not in metrics:
            raise AutoclsError(
                f"Step '{step.name}' has metric: {metric}, which {step.dir / 'metrics.json'} does not hold; set the "
                f"step's metric to one of {', '.join(sorted(k for k in metrics if '/' in k))}."
            )
        last = step.dir / "checkpoints" / "last.ckpt"
        ckpt = metrics.get("best_ckpt") or (str(last) if last.is_file() else None)
        outputs = {"dir": str(step.dir), "metrics": metrics, "ckpt": ckpt}
        return Outcome(outputs, _result(metric, metrics[metric], metrics.get("test/acc")))


class Sweep(StepKind):
    """A `python train.py -m hparams_search=...` sweep with the step directory as its sweep dir; the
    study's journal lives there, so a killed sweep continues with the trials it had not finished."""

    name = "sweep"
    outputs = ("dir", "best_params", "best_overrides", "best_value", "best_run_dir", "results")

    def command(self, step: Step, overrides: list[str]) -> list[str]:
        return [sys.executable, str(ROOT / "train.py"), "-m", *overrides, f"hydra.sweep.dir={step.dir}"]

    def planned_outputs(self, step: Step) -> dict[str, Any]:
        return {"dir": str(step.dir), "best_params": {}, "best_overrides": [], "best_value": None,
                "best_run_dir": str(step.dir / "0"), "results": str(step.dir / "optimization_results.yaml")}

    def collect(self, step: Step) -> Outcome:
        import yaml

        path = step.dir / "optimization_results.yaml"
        if not path.is_file():
            raise AutoclsError(f"Step '{step.name}' ended without writing {path}; check that its overrides select "
                               "a sweep (hparams_search=<name>) and read its log.")
        results = yaml.safe_load(path.read_text()) or {}
        if "pareto_front" in results:
            raise AutoclsError(f"Step '{step.name}' optimises several metrics ({', '.join(results['objectives'])}); "
                               "a pipeline passes one best trial on, so give the sweep one optimized_metric.")
        if "best_params" not in results:
            raise AutoclsError(
                f"Step '{step.name}' finished without a completed trial ({results.get('n_trials')}); read the errors "
                f"in {step.dir / 'trials.csv'}, fix their cause, delete {step.dir} and rerun the same command."
            )
        best_run = Path(results["best_run_dir"]) if results.get("best_run_dir") else None
        trial_metrics = {}
        if best_run is not None and (best_run / "metrics.json").is_file():
            trial_metrics = json.loads((best_run / "metrics.json").read_text())
        outputs = {"dir": str(step.dir), "best_params": results["best_params"],
                   "best_overrides": list(results["best_overrides"]), "best_value": results["best_value"],
                   "best_run_dir": str(best_run) if best_run else None, "results": str(path)}
        return Outcome(outputs, _result(results["objectives"][0], results["best_value"], trial_metrics.get("test/acc")))


class PBA(StepKind):
    """`scripts/pba_search.py` with the step directory as `--out` and the step's `args:` as its options
    (population, epochs, interval, workers, gpus, metric, seed, ...); it resumes from its own state file."""

    name = "pba"
    outputs = ("dir", "schedule", "best_score")
    takes_args = True

    def command(self, step: Step, overrides: list[str]) -> list[str]:
        options = []
        for key, value in step.args.items():
            value = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
            options += [f"--{key}", str(value)]
        return [sys.executable, str(ROOT / "scripts" / "pba_search.py"), "--out", str(step.dir), *options, "--",
                *overrides]

    def planned_outputs(self, step: Step) -> dict[str, Any]:
        return {"dir": str(step.dir), "schedule": str(step.dir / "schedule.json"), "best_score": None}

    def collect(self, step: Step) -> Outcome:
        schedule, population = step.dir / "schedule.json", step.dir / "population.csv"
        for path in (schedule, population):
            if not path.is_file():
                raise AutoclsError(f"Step '{step.name}' ended without writing {path}; read its log, fix the cause "
                                   "and rerun the same command.")
        with open(population, newline="") as f:
            reader = csv.DictReader(f)
            metric = reader.fieldnames[2]  # round, member, <metric>, ...
            rows = list(reader)
        last_round = max(int(r["round"]) for r in rows)
        best = max(float(r[metric]) for r in rows if int(r["round"]) == last_round)
        outputs = {"dir": str(step.dir), "schedule": str(schedule), "best_score": best}
        return Outcome(outputs, _result(metric, best))

    def train_overrides(self, overrides: list[str]) -> list[str]:
        return [*overrides, "augmentation=pba"]  # what every member's run adds


def display_command(command: list[str]) -> str:
    """A step's command as a user would type it in the repository root."""
    scripts = (str(ROOT / "train.py"), str(ROOT / "scripts"))
    return shlex.join(["python", *[str(Path(a).relative_to(ROOT)) if a.startswith(scripts) else a for a in command[1:]]])


KINDS: dict[str, StepKind] = {kind.name: kind for kind in (TrainRun(), Sweep(), PBA())}


def _read_metrics(step: Step, path: Path) -> dict:
    if not path.is_file():
        raise AutoclsError(f"Step '{step.name}' ended without writing {path}; read its log, fix the cause and rerun "
                           "the same command.")
    return json.loads(path.read_text())


def _result(metric: str, value, test_acc=None) -> dict:
    result = {"metric": metric, "value": None if value is None else float(value)}
    if test_acc is not None:
        result["test/acc"] = float(test_acc)
    return result
