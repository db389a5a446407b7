"""What a sweep leaves in its directory for people and for the next step: a trials table, the best
parameters as overrides, and plots. Everything is rebuilt from the study's storage, so a rerun, a resumed
sweep or a second worker rewrites the same files with every trial in them.

    trials.csv                 one row per trial: number, state, objective values, params, duration, epochs
    optimization_results.yaml  best trial (or the Pareto front) with its params and ready-to-use overrides
    optimization_history.png   objective per trial with the running best (one panel per objective)
    param_importances.png      fANOVA importances (with at least two finished trials)
    intermediate_values.png    the per-epoch curves that the pruner judged
    pareto_front.png           several objectives: every trial, the front highlighted
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from src.hpo.search_space import value_text

log = logging.getLogger(__name__)

# trials the sweeper records only for bookkeeping (see hydra_plugins/autocls_optuna_sweeper/_core.py)
INTERRUPTED, SURPLUS, CONFIG_ERROR = "interrupted", "surplus", "config_error"
TRIALS_CSV, RESULTS_YAML = "trials.csv", "optimization_results.yaml"


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that are part of the study's results: not the runs an interruption cut short (their
    parameters were queued again), the extra trials that concurrent workers asked for, or a trial that
    ended the sweep because of a config mistake (it would otherwise use up a slot of the fixed rerun)."""
    return [t for t in study.get_trials(deepcopy=False)
            if not any(t.user_attrs.get(tag) for tag in (INTERRUPTED, SURPLUS, CONFIG_ERROR))]


def write_trials_csv(study: optuna.Study, objectives: Sequence[str], path: Path) -> Path:
    trials = [t for t in counted_trials(study) if t.state != TrialState.WAITING]
    param_names = sorted({name for t in trials for name in t.params})
    header = ["number", "state", *objectives, *[f"params/{p}" for p in param_names],
              "duration_s", "epochs", "run_dir", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for t in sorted(trials, key=lambda t: t.number):
            values = list(t.values) if t.values is not None else [None] * len(objectives)
            duration = t.duration.total_seconds() if t.duration is not None else None
            writer.writerow([
                t.number, t.state.name, *values, *[t.params.get(p) for p in param_names],
                None if duration is None else round(duration, 2), _epochs(t),
                t.user_attrs.get("run_dir"), t.user_attrs.get("error"),
            ])
    return path


def _epochs(trial: FrozenTrial) -> int | None:
    if "epochs" in trial.user_attrs:
        return int(trial.user_attrs["epochs"])
    return trial.last_step  # a pruned trial reported its last epoch


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best completed trial, or the Pareto front for several objectives (empty before any finished)."""
    completed = [t for t in counted_trials(study) if t.state == TrialState.COMPLETE]
    if not completed:
        return []
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def write_results_yaml(study: optuna.Study, objectives: Sequence[str], path: Path,
                       verbatim: frozenset[str] = frozenset()) -> dict:
    """`optimization_results.yaml`: the best trial's params (hydra-optuna-sweeper's `best_params` key),
    the Hydra overrides that reproduce it, and for several objectives the whole Pareto front."""

    def entry(t: FrozenTrial) -> dict:
        return {
            "number": t.number,
            "values": dict(zip(objectives, t.values)),
            "params": dict(t.params),
            "overrides": [f"{k}={v if k in verbatim else value_text(v)}" for k, v in t.params.items()],
            "run_dir": t.user_attrs.get("run_dir"),
        }

    best = best_trials(study)
    states = [t.state.name for t in counted_trials(study)]
    results = {
        "study_name": study.study_name,
        "objectives": list(objectives),
        "directions": [d.name.lower() for d in study.directions],
        "n_trials": {s: states.count(s) for s in sorted(set(states))},
    }
    if len(study.directions) == 1 and best:
        results.update(best_trial=best[0].number, best_value=best[0].value, best_params=dict(best[0].params),
                       best_overrides=entry(best[0])["overrides"], best_run_dir=best[0].user_attrs.get("run_dir"))
    elif best:
        results["pareto_front"] = [entry(t) for t in sorted(best, key=lambda t: t.values[0])]
    path.write_text(yaml.safe_dump(results, sort_keys=False))
    return results


def write_plots(study: optuna.Study, objectives: Sequence[str], out_dir: Path) -> list[Path]:
    """The PNG plots that the study supports so far; a plot Optuna cannot draw yet (too few trials) is
    skipped with a log line, never an error that would hide the sweep's results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    finished = [t for t in counted_trials(study) if t.state == TrialState.COMPLETE]
    if not finished:
        return []
    multi = len(study.directions) > 1
    plots = {"optimization_history": lambda: _history(study, objectives)}
    if len({n for t in finished for n in t.params}) and len(finished) >= 2:
        plots["param_importances"] = lambda: ovm.plot_param_importances(
            study, target=(lambda t: t.values[0]) if multi else None, target_name=objectives[0])
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate_values"] = lambda: ovm.plot_intermediate_values(study)
    if multi:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=list(objectives))
    written = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # matplotlib backends are "experimental" in Optuna
                drawn = draw()
            figure = _figure(drawn)
            figure.set_size_inches(max(figure.get_size_inches()[0], 7), max(figure.get_size_inches()[1], 4.5))
            figure.tight_layout()
            path = out_dir / f"{name}.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(path)
        except Exception as exc:  # noqa: BLE001 - a plot is a convenience; the CSV and YAML carry the results
            log.warning(f"Skipped {name}.png: {type(exc).__name__}: {exc}")
    return written


def _figure(drawn):
    import numpy as np

    if hasattr(drawn, "savefig"):
        return drawn
    first = np.ravel(drawn)[0] if isinstance(drawn, np.ndarray) else drawn
    return first.figure


def _history(study: optuna.Study, objectives: Sequence[str]):
    """Each objective per trial (completed: dots, pruned: crosses) with the running best as a line."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trials = sorted(counted_trials(study), key=lambda t: t.number)
    fig, axes = plt.subplots(1, len(objectives), figsize=(6 * len(objectives), 4.2), squeeze=False)
    for i, (ax, name, direction) in enumerate(zip(axes[0], objectives, study.directions)):
        done = [t for t in trials if t.state == TrialState.COMPLETE and _finite(t.values[i])]
        pruned = [t for t in trials if t.state == TrialState.PRUNED and t.values and _finite(t.values[0])]
        ax.scatter([t.number for t in done], [t.values[i] for t in done], s=18, label="complete")
        if pruned and i == 0:
            ax.scatter([t.number for t in pruned], [t.values[0] for t in pruned], marker="x", s=18,
                       color="tab:gray", label="pruned (last epoch)")
        best, xs, ys = None, [], []
        for t in done:
            better = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
            best = t.values[i] if best is None else better(best, t.values[i])
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
        ax.set(xlabel="trial", ylabel=name, title=f"{study.study_name}: {name}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def write_report(study: optuna.Study, objectives: Sequence[str], out_dir: Path, plots: bool = True,
                 verbatim: frozenset[str] = frozenset()) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_trials_csv(study, objectives, out_dir / TRIALS_CSV)
    results = write_results_yaml(study, objectives, out_dir / RESULTS_YAML, verbatim)
    if plots:
        write_plots(study, objectives, out_dir)
    return results
