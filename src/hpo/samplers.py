"""Samplers that the sweeper builds differently from Optuna's defaults."""

from __future__ import annotations

from optuna.samplers import GridSampler


class GridSearchSampler(GridSampler):
    """Optuna's grid sampler for an ask-and-tell loop.

    `GridSampler.after_trial` calls `study.stop()` once the grid is covered, which only works inside
    `study.optimize` and raises from `study.tell` otherwise. The sweeper bounds the number of trials by
    the grid's size itself, so there is nothing to stop. The search space comes from the sweeper's
    `params` (every `choice`/`range` value), so configs name no grid twice.
    """

    def after_trial(self, study, trial, state, values) -> None:
        pass
