"""The Hydra side of the sweeper: its config schema, the sampler/pruner config groups, the plugin class.

Selected with `override /hydra/sweeper: autocls_optuna` in a defaults list (configs/hparams_search/);
samplers and pruners are config groups under it (`hydra/sweeper/sampler=random`,
`hydra/sweeper/pruner=hyperband` on the command line) or any Optuna `_target_` written inline.
"""

# no `from __future__ import annotations`: Hydra executes this module before it is in sys.modules, where
# dataclasses would look up string annotations
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class AutoclsOptunaSweeperConf:
    _target_: str = "hydra_plugins.autocls_optuna_sweeper.optuna_sweeper.AutoclsOptunaSweeper"
    # the sweeper builds sampler and pruner itself (the grid sampler needs the parsed search space)
    _recursive_: bool = False
    # _self_ first: the sampler and pruner groups fill the `sampler`/`pruner` fields below
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = None
    pruner: Any = None
    # maximize/minimize, or a list with one entry per name in the task's `optimized_metric` list
    direction: Any = "maximize"
    # several workers (processes, machines) with the same study name and storage share one study
    study_name: str = "autocls"
    # null: a journal file in the sweep dir; "sqlite": an SQLite file there; or any RDB URL / journal path
    storage: str | None = None
    # the study's total: a rerun after an interruption (or with a larger number) runs only what is missing
    n_trials: int | None = 20
    # trials per launcher batch (parallel with the joblib or submitit launcher; sequential with basic)
    n_jobs: int = 1
    # seconds after which this worker starts no new batch
    timeout: float | None = None
    # "all", or "best": delete the checkpoints of finished trials that are not the best (or not on the
    # Pareto front) after each batch, so a long sweep does not fill the disk (src/hpo/trial_checkpoints.py)
    keep_checkpoints: str = "all"
    # the search space: `key: choice(...) | range(...) | interval(...) | tag(log, interval(...)) | [a, b]`;
    # plain values are fixed overrides for every trial
    params: Any | None = None
    # points to try first, each {key: value} over the keys of `params` (e.g. the unpruned base of a compression
    # search, or a known-good recipe); a point the study has already tried is not queued again
    enqueue: Any | None = None


def _store(group: str, name: str, target: str, **kwargs: Any) -> None:
    ConfigStore.instance().store(
        group=group, name=name, node={"_target_": target, **kwargs}, provider="autocls_optuna_sweeper"
    )


ConfigStore.instance().store(
    group="hydra/sweeper", name="autocls_optuna", node=AutoclsOptunaSweeperConf, provider="autocls_optuna_sweeper"
)
# samplers: Bayesian (TPE), random, exhaustive grid, CMA-ES, quasi-random, and NSGA-II for several objectives
_SAMPLERS = "hydra/sweeper/sampler"
_store(_SAMPLERS, "tpe", "optuna.samplers.TPESampler", seed=None, n_startup_trials=10, multivariate=False)
_store(_SAMPLERS, "random", "optuna.samplers.RandomSampler", seed=None)
_store(_SAMPLERS, "grid", "src.hpo.samplers.GridSearchSampler", seed=None)
_store(_SAMPLERS, "cmaes", "optuna.samplers.CmaEsSampler", seed=None, n_startup_trials=1)
_store(_SAMPLERS, "qmc", "optuna.samplers.QMCSampler", qmc_type="sobol", scramble=True, seed=None)
_store(_SAMPLERS, "nsgaii", "optuna.samplers.NSGAIISampler", population_size=50, seed=None)
# pruners (they act through src.hpo.pruning.OptunaPruning, which reports each epoch's metric)
_PRUNERS = "hydra/sweeper/pruner"
_store(_PRUNERS, "none", "optuna.pruners.NopPruner")
_store(_PRUNERS, "median", "optuna.pruners.MedianPruner", n_startup_trials=5, n_warmup_steps=1)
# asynchronous successive halving (Li et al. 2020): rungs at min_resource * reduction_factor^k epochs
_store(_PRUNERS, "asha", "optuna.pruners.SuccessiveHalvingPruner", min_resource=1, reduction_factor=3)
_store(_PRUNERS, "hyperband", "optuna.pruners.HyperbandPruner", min_resource=1, max_resource="auto",
       reduction_factor=3)


class AutoclsOptunaSweeper(Sweeper):
    """Asks Optuna for trials, runs them as Hydra jobs through the configured launcher, tells the results."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self._sweep = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra_plugins.autocls_optuna_sweeper._core import OptunaSweep
        from src.utils.task import user_errors_as_messages

        # the settings are checked here, before sweep(): a mistake in them is one sentence too
        self._sweep = user_errors_as_messages(OptunaSweep)(
            self.settings, hydra_context=hydra_context, task_function=task_function, config=config,
            validate_batch=self._validate)
        self.hydra_context, self.config = hydra_context, config

    def _validate(self, batch):
        self.validate_batch_is_legal(batch)

    def sweep(self, arguments: list[str]) -> Any:
        from src.utils.task import user_errors_as_messages

        assert self._sweep is not None, "setup() runs before sweep()"
        return user_errors_as_messages(self._sweep.run)(arguments)
