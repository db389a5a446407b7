"""Replay search methods on a recorded grid: a tabular benchmark built from a finished grid sweep.

A single run of TPE or ASHA is one draw of a random process; whether it lands within a fraction of a
point of grid search's best says little about the method. Once the grid has been trained, every point
of the space has a recorded learning curve (the val metric reported each epoch, which the pruning
callback stores in the study) and a final test accuracy. Any method restricted to the grid's points
can then be re-run for free, with Optuna's own samplers and pruners, as many times as there are seeds:
its trial at point x "trains" by reading x's curve epoch by epoch and is pruned exactly where the live
pruner would have stopped it, because the live sweep reports the same values in the same order
(tabular benchmarks such as LCBench and NAS-Bench-201 evaluate methods the same way).

The space is ordinal: each grid dimension becomes an integer index over its sorted values, so TPE and
the pruners see neighbouring learning rates as neighbours, as they see the continuous space live.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna


@dataclass(frozen=True)
class GridPoint:
    """One trained grid point: its params, val metric per epoch (1-based), and final test accuracy."""

    params: dict[str, float]
    curve: dict[int, float]
    test: float | None = None

    @property
    def best(self) -> float:
        """The objective the sweeps optimise: the best val metric over the epochs trained."""
        return max(self.curve.values())


@dataclass
class GridTable:
    """A finished grid as a lookup table from grid indices to recorded points."""

    points: list[GridPoint]
    axes: dict[str, list[float]] = field(init=False)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("the grid table is empty: the sweep has no complete trial with reported epochs")
        names = list(self.points[0].params)
        self.axes = {n: sorted({p.params[n] for p in self.points}) for n in names}
        self._by_index = {self.index_of(p.params): p for p in self.points}
        size = math.prod(len(v) for v in self.axes.values())
        if len(self._by_index) != size:
            raise ValueError(f"the grid table has {len(self._by_index)} distinct points of the {size} its axes span: "
                             "finish the grid sweep (rerun it) before replaying methods on it")
        self.max_epochs = max(max(p.curve) for p in self.points)

    def index_of(self, params: dict[str, float]) -> tuple[int, ...]:
        return tuple(self.axes[n].index(params[n]) for n in self.axes)

    def at(self, index: tuple[int, ...]) -> GridPoint:
        return self._by_index[index]

    @property
    def best(self) -> GridPoint:
        return max(self.points, key=lambda p: p.best)


def load_grid_table(storage: Any, study_name: str, test_metric: str = "test/acc") -> GridTable:
    """The complete trials of a grid study (a storage object or URL) with their reported curves; the test
    accuracy is read from each trial's run dir `metrics.json` (recorded by the sweeper as `run_dir`)."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    points = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if not trial.intermediate_values:
            continue
        test = None
        metrics = Path(trial.user_attrs.get("run_dir", "")) / "metrics.json"
        if metrics.is_file():
            test = json.loads(metrics.read_text()).get(test_metric)
        points.append(GridPoint(dict(trial.params), {int(k): float(v) for k, v in trial.intermediate_values.items()},
                                test))
    return GridTable(points)


@dataclass(frozen=True)
class ReplayResult:
    method: str
    seed: int
    best: GridPoint
    trials: int
    pruned: int
    epochs: int


def replay(table: GridTable, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
           n_trials: int, *, method: str = "", seed: int = 0) -> ReplayResult:
    """Run `n_trials` sequential trials of one sampler/pruner on the table, as the live sweeper would."""
    # named: Optuna's Hyperband assigns trials to brackets by hashing the study name with the trial number
    study = optuna.create_study(study_name=f"replay-{method}-{seed}", direction="maximize", sampler=sampler,
                                pruner=pruner)
    epochs = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal epochs
        index = tuple(trial.suggest_int(name, 0, len(values) - 1) for name, values in table.axes.items())
        point = table.at(index)
        trial.set_user_attr("index", index)
        best = -math.inf
        for epoch in sorted(point.curve):
            epochs += 1
            best = max(best, point.curve[epoch])
            # the live callback reports val/acc each epoch and asks the pruner after each report
            trial.report(point.curve[epoch], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    study.optimize(objective, n_trials=n_trials)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"{method}: every replayed trial was pruned; give it more trials")
    winner = max(complete, key=lambda t: t.value)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return ReplayResult(method, seed, table.at(tuple(winner.user_attrs["index"])), len(study.trials), pruned, epochs)


Method = Callable[[int], tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner, int]]


def replay_many(table: GridTable, methods: dict[str, Method], seeds: list[int]) -> dict[str, list[ReplayResult]]:
    """Each method (seed -> sampler, pruner, n_trials) replayed once per seed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {}
    for name, make in methods.items():
        out[name] = []
        for seed in seeds:
            sampler, pruner, n_trials = make(seed)
            out[name].append(replay(table, sampler, pruner, n_trials, method=name, seed=seed))
    return out


def summarise_replays(table: GridTable, results: list[ReplayResult], tolerance: float) -> dict[str, float]:
    """Gaps to the grid's best (in accuracy points) over the seeds, and compute against the full grid."""
    grid_best, grid_epochs = table.best, sum(len(p.curve) for p in table.points)
    gaps = [100 * (grid_best.best - r.best.best) for r in results]
    out = {
        "seeds": len(results),
        "val_gap_mean": statistics.fmean(gaps),
        "val_gap_median": statistics.median(gaps),
        "val_gap_worst": max(gaps),
        "within_tolerance": sum(g <= tolerance + 1e-9 for g in gaps) / len(gaps),
        "trials_mean": statistics.fmean(r.trials for r in results),
        "trials_vs_grid": statistics.fmean(r.trials for r in results) / len(table.points),
        "epochs_mean": statistics.fmean(r.epochs for r in results),
        "epochs_vs_grid": statistics.fmean(r.epochs for r in results) / grid_epochs,
    }
    if grid_best.test is not None and all(r.best.test is not None for r in results):
        out["test_gap_mean"] = statistics.fmean(100 * (grid_best.test - r.best.test) for r in results)
    return out
