"""Which trials of a sweep keep their checkpoints.

Every trial saves its own checkpoints (`<sweep dir>/<n>/checkpoints/`): a ResNet-18 grid of 108 trials
writes about 15 GB, enough to fill a disk halfway through. With `hydra.sweeper.keep_checkpoints=best`
the sweeper deletes, after each batch, the checkpoints of every finished trial that is not the study's
best (or, with several objectives, not on its Pareto front). A trial that loses its place later loses
its checkpoints then; the best trial's stay for deployment, the pipeline's next step and resumed
sweeps. Metrics, logs and `metrics.json` stay for every trial (its `best_ckpt` path then names a
deleted file).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import optuna
from optuna.trial import TrialState

from src.hpo.report import counted_trials
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

KEEP_CHOICES = ("all", "best")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def check_keep_setting(keep: str) -> str:
    if keep not in KEEP_CHOICES:
        raise AutoclsError(f"hydra.sweeper.keep_checkpoints={keep!r} is not one of {', '.join(KEEP_CHOICES)}; "
                           "'best' keeps only the best trial's (or the Pareto front's) checkpoints.")
    return keep


def best_trial_numbers(study: optuna.Study) -> set[int]:
    """The best trial, or the Pareto front for several objectives; empty before any trial completes."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return set()
    return {t.number for t in study.best_trials}


def drop_checkpoints(study: optuna.Study) -> list[Path]:
    """Delete the `checkpoints/` folder of each finished trial that is not among the best; returns them."""
    keep = best_trial_numbers(study)
    dropped = []
    for trial in counted_trials(study):
        if trial.state not in FINISHED or trial.number in keep or "run_dir" not in trial.user_attrs:
            continue
        folder = Path(str(trial.user_attrs["run_dir"])) / "checkpoints"
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            dropped.append(folder)
    if dropped:
        log.info(f"keep_checkpoints=best: deleted the checkpoints of {len(dropped)} trial(s) that are not the best.")
    return dropped
