"""Report each epoch's metric to the Optuna trial this run belongs to, and stop it when the pruner says so."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pytorch_lightning as pl

from src.utils.errors import ConfigError

log = logging.getLogger(__name__)


class ObjectiveNotLoggedError(ConfigError):
    """A metric the sweep optimises or monitors is not among the run's metrics (a config mistake that
    every trial would repeat, so the sweeper stops instead of recording failures)."""


def missing_metric_error(name: str, available: Sequence[str], setting: str) -> ObjectiveNotLoggedError:
    names = ", ".join(sorted(available)) or "none"
    return ObjectiveNotLoggedError(
        f"{setting}={name} is not a metric this run logs (it logs: {names}); set {setting} to one of them."
    )


class OptunaPruning(pl.Callback):
    """Multi-fidelity search: after every validation, `monitor` goes to the trial as the intermediate value
    for step = epochs trained, and a trial the pruner rejects stops at the end of that epoch and is
    recorded as PRUNED (with the epochs it ran), not FAIL; the run still tests and writes metrics.json.

    `trial` is the `optuna_trial` entry the sweeper sets for each job ({storage, study_name, number, pruner},
    the pruner already built by Hydra from its `_target_`); the trial is re-attached from the storage, so
    this works in any launcher's process. Without it (a plain
    run) the callback does nothing. Under DDP rank 0 talks to the storage and broadcasts the decision.
    `objectives` (the task's `optimized_metric`) are checked after the first validation, so a name the run
    never logs ends the sweep at once instead of after the first full trial.
    """

    def __init__(self, trial: Mapping | None = None, monitor: str = "val/acc",
                 objectives: str | Sequence[str] | None = None) -> None:
        self.trial_ref = dict(trial) if trial else None
        self.monitor = monitor
        self.objectives = [objectives] if isinstance(objectives, str) else list(objectives or [])
        self._trial = None
        self.pruned_at: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.trial_ref is None or not trainer.is_global_zero:
            return
        from src.hpo.storage import load_trial

        ref = self.trial_ref
        self._trial = load_trial(ref["storage"], ref["study_name"], int(ref["number"]), ref.get("pruner"))
        if len(self._trial.study.directions) > 1:
            log.warning("Optuna cannot prune multi-objective studies; this trial runs all its epochs.")
            self._trial = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.trial_ref is None:
            return
        logged = trainer.callback_metrics
        # every rank checks (the metrics are synced), so no rank waits in a broadcast another skipped
        if self.monitor not in logged:
            raise missing_metric_error(self.monitor, logged, "callbacks.optuna_pruning.monitor")
        for name in self.objectives:
            if name.startswith(("val/", "train/")) and name not in logged:
                raise missing_metric_error(name, logged, "optimized_metric")
        epochs = trainer.current_epoch + 1
        prune = False
        if self._trial is not None:
            self._trial.report(float(logged[self.monitor]), step=epochs)
            prune = self._trial.should_prune()
        prune = trainer.strategy.broadcast(prune, src=0)
        if not prune:
            return
        trainer.should_stop = True
        self.pruned_at = epochs
        if self._trial is not None:
            import optuna

            self._trial.set_user_attr("epochs", epochs)
            self._trial.study.tell(self._trial.number, state=optuna.trial.TrialState.PRUNED)
            log.info(f"Trial {self._trial.number} pruned after {epochs} epochs ({self.monitor}="
                     f"{float(logged[self.monitor]):.4f}).")
