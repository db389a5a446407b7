"""The tabular replay of search methods on a recorded grid (src/hpo/tabular_replay.py)."""

from __future__ import annotations

import itertools
import json

import optuna
import pytest

from src.hpo.tabular_replay import (
    GridPoint,
    GridTable,
    ReplayResult,
    load_grid_table,
    replay,
    replay_many,
    summarise_replays,
)

LRS, WDS = [0.01, 0.1, 1.0], [0.0, 0.5]


def make_table(epochs: int = 4) -> GridTable:
    """A 3 x 2 grid whose val metric rises each epoch; the best point is lr 0.1, wd 0 (index (1, 0))."""
    points = []
    for i, j in itertools.product(range(3), range(2)):
        final = 0.9 - 0.2 * abs(i - 1) - 0.1 * j
        curve = {e: final * e / epochs for e in range(1, epochs + 1)}
        points.append(GridPoint({"lr": LRS[i], "wd": WDS[j]}, curve, test=final - 0.05))
    return GridTable(points)


def write_grid_study(directory, table: GridTable, study_name: str, points: list[GridPoint] | None = None
                     ) -> optuna.storages.BaseStorage:
    """A grid sweep as the live sweeper leaves it: a journal study whose complete trials (`points`, by
    default all of the table's) carry their reported curves and run dirs (with metrics.json), plus one
    failed trial."""
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(directory / "optuna.journal")))
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize")
    distributions = {name: optuna.distributions.CategoricalDistribution(values) for name, values in table.axes.items()}
    for n, point in enumerate(table.points if points is None else points):
        study.enqueue_trial(point.params)
        trial = study.ask(distributions)
        run_dir = directory / str(n)
        run_dir.mkdir()
        (run_dir / "metrics.json").write_text(json.dumps({"test/acc": point.test}))
        trial.set_user_attr("run_dir", str(run_dir))
        for epoch, value in point.curve.items():
            trial.report(value, epoch)
        study.tell(trial, point.best)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    return storage


class FixedOrder(optuna.samplers.BaseSampler):
    """Visits the given grid indices in order (trial n gets order[n])."""

    def __init__(self, order: list[tuple[int, int]]) -> None:
        self.order = order

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.order[trial.number][["lr", "wd"].index(param_name)]


def test_table_axes_index_and_best():
    table = make_table()
    assert table.axes == {"lr": LRS, "wd": WDS}
    assert table.index_of({"lr": 1.0, "wd": 0.5}) == (2, 1)
    assert table.best.params == {"lr": 0.1, "wd": 0.0}
    assert table.best.best == pytest.approx(0.9)
    assert table.max_epochs == 4


def test_incomplete_grid_is_refused_with_the_fix():
    points = make_table().points[:-1]
    with pytest.raises(ValueError, match="5 distinct points of the 6.*finish the grid sweep"):
        GridTable(points)
    with pytest.raises(ValueError, match="empty"):
        GridTable([])


def test_replay_counts_epochs_where_the_pruner_stops():
    """Median pruning after one complete trial: a point below it at epoch 1 stops there (1 epoch), a point
    above it runs all 4; the winner is the best complete trial."""
    table = make_table()
    order = [(0, 0), (2, 1), (1, 0)]  # final 0.7, then 0.6 (below the median at epoch 1), then the best 0.9
    result = replay(table, FixedOrder(order), optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
                    n_trials=3)
    assert (result.trials, result.pruned, result.epochs) == (3, 1, 4 + 1 + 4)
    assert result.best.params == {"lr": 0.1, "wd": 0.0}


def test_replay_without_pruner_trains_every_trial_fully():
    table = make_table()
    result = replay(table, optuna.samplers.RandomSampler(seed=0), optuna.pruners.NopPruner(), n_trials=5)
    assert result.epochs == 5 * 4 and result.pruned == 0
    assert result.best.best <= table.best.best


def test_replay_is_deterministic_per_seed():
    table = make_table()

    def bohb(seed):
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=4, reduction_factor=3)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=2), pruner, 6

    first, second = (replay_many(table, {"bohb": bohb}, [0, 1, 2])["bohb"] for _ in range(2))
    assert [(r.best.params, r.epochs, r.pruned) for r in first] == [(r.best.params, r.epochs, r.pruned) for r in second]


def test_summary_gaps_and_compute_against_the_grid():
    table = make_table()
    second_best = table.at((1, 1))  # final 0.8: 10 points below the best
    results = [ReplayResult("m", 0, table.best, trials=3, pruned=0, epochs=12),
               ReplayResult("m", 1, second_best, trials=3, pruned=1, epochs=6)]
    summary = summarise_replays(table, results, tolerance=0.4)
    assert summary["val_gap_mean"] == pytest.approx(5.0)
    assert summary["val_gap_worst"] == pytest.approx(10.0)
    assert summary["within_tolerance"] == pytest.approx(0.5)
    assert summary["test_gap_mean"] == pytest.approx(5.0)
    assert summary["trials_vs_grid"] == pytest.approx(3 / 6)
    assert summary["epochs_vs_grid"] == pytest.approx(9 / 24)


def test_load_grid_table_reads_curves_and_test_accuracy(tmp_path):
    reference = make_table()
    storage = write_grid_study(tmp_path, reference, "grid")
    table = load_grid_table(storage, "grid")
    assert len(table.points) == 6
    for point in reference.points:
        loaded = table.at(table.index_of(point.params))
        assert loaded.curve == pytest.approx(point.curve) and loaded.test == pytest.approx(point.test)


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hpo_efficiency_lr_axis_keeps_its_shape_when_scaled():
    script = _script("hpo_efficiency")
    assert script.lr_space("grid", 8) == "optimizer.lr=choice(0.025,0.05,0.1,0.2)"
    assert script.lr_space("tpe", 8) == "optimizer.lr=tag(log,interval(0.025,0.2))"
    assert script.lr_space("grid", 1) == "optimizer.lr=choice(0.003125,0.00625,0.0125,0.025)"


def test_hpo_efficiency_replays_methods_on_a_finished_grid(tmp_path, capsys):
    """The script's replay: sampler/pruner settings from the sweeper's configs, a row per method."""
    import argparse

    script = _script("hpo_efficiency")
    table = make_table(epochs=9)
    args = argparse.Namespace(tpe_trials=3, asha_trials=4, bohb_trials=4, replay_seeds=3)
    # an unfinished grid (5 of its 6 points): no replay, one line saying why
    (tmp_path / "partial").mkdir()
    write_grid_study(tmp_path / "partial", table, "transfer_grid", points=table.points[:-1])
    assert script.replay_on_grid(tmp_path / "partial", args) == {}
    assert "No replay: the grid table has 5 distinct points of the 6" in capsys.readouterr().out

    write_grid_study(tmp_path, table, "transfer_grid")
    summaries = script.replay_on_grid(tmp_path, args)
    out = capsys.readouterr().out
    assert set(summaries) == {"random", "tpe", "asha", "bohb"}
    for method in summaries:
        assert f"| {method} |" in out
    assert summaries["tpe"]["trials_mean"] == 3 and summaries["tpe"]["epochs_mean"] == 3 * 9
    # successive halving stops some trials after 1 or 3 of the 9 epochs
    assert summaries["asha"]["epochs_mean"] < 4 * 9
    assert all(0 <= s["val_gap_mean"] <= 30 for s in summaries.values())
