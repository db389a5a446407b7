"""keep_checkpoints=best (src/hpo/trial_checkpoints.py): which trials keep their checkpoint folders."""

from __future__ import annotations

import optuna
import pytest

from src.hpo.trial_checkpoints import check_keep_setting, drop_checkpoints
from src.utils.errors import AutoclsError


def add_trial(study, tmp_path, number, values, state=optuna.trial.TrialState.COMPLETE):
    run_dir = tmp_path / str(number)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    study.add_trial(optuna.trial.create_trial(
        values=values if state == optuna.trial.TrialState.COMPLETE else None, state=state,
        user_attrs={"run_dir": str(run_dir)}))
    return run_dir / "checkpoints"


def test_single_objective_keeps_only_the_best_finished_trial(tmp_path):
    study = optuna.create_study(direction="maximize")
    folders = [add_trial(study, tmp_path, 0, [0.5]), add_trial(study, tmp_path, 1, [0.9]),
               add_trial(study, tmp_path, 2, None, optuna.trial.TrialState.FAIL)]
    assert sorted(drop_checkpoints(study)) == sorted([folders[0], folders[2]])
    assert [f.exists() for f in folders] == [False, True, False]
    # a later, better trial takes the place: the former best loses its checkpoints then
    better = add_trial(study, tmp_path, 3, [0.95])
    drop_checkpoints(study)
    assert (folders[1].exists(), better.exists()) == (False, True)


def test_several_objectives_keep_the_pareto_front(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])  # accuracy, latency
    front_a = add_trial(study, tmp_path, 0, [0.9, 2.0])
    front_b = add_trial(study, tmp_path, 1, [0.8, 1.0])
    dominated = add_trial(study, tmp_path, 2, [0.7, 3.0])
    drop_checkpoints(study)
    assert (front_a.exists(), front_b.exists(), dominated.exists()) == (True, True, False)


def test_failed_trials_lose_their_checkpoints_before_any_trial_completes(tmp_path):
    study = optuna.create_study(direction="maximize")
    failed = add_trial(study, tmp_path, 0, None, optuna.trial.TrialState.FAIL)
    assert drop_checkpoints(study) == [failed] and not failed.exists()


def test_unknown_setting_is_one_sentence():
    assert check_keep_setting("best") == "best"
    with pytest.raises(AutoclsError, match="not one of all, best"):
        check_keep_setting("last")
