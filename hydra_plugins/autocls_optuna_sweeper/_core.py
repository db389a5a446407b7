"""The sweep loop: ask Optuna for a batch of trials, run them as Hydra jobs, tell the results, repeat.

Resuming and sharing a study rest on three rules:

* `n_trials` is the study's total. Each batch asks only for what is missing, counting the trials of every
  worker (running ones too), so a rerun after an interruption runs the remaining trials only, and two
  workers on one storage stop together. When workers race for the last slots, the trials beyond the
  total (by trial number) are recorded as `surplus` and not run.
* A trial cut short (Ctrl-C, a killed worker) is marked `interrupted` (FAIL) and its parameters are queued
  again, so the next run retries that configuration; if the job had already written its metrics.json
  the values are taken from there instead. A worker's trials count as cut short when the worker (host +
  pid, recorded on each trial) is gone.
* Trials run in `<sweep dir>/<trial number>`, stable across reruns and workers.

A crashing trial is recorded as FAIL with its one-line error and the sweep goes on, unless the error is a
`ConfigError` (a mistake every trial would repeat: the sweep stops with its sentence) or a full disk (the
trial is cut short and queued again, and the sweep stops with a sentence); a pruned trial (the
`OptunaPruning` callback tells the storage itself) stays PRUNED.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.trial import TrialState

from src.hpo.pruning import ObjectiveNotLoggedError, missing_metric_error
from src.hpo.report import (
    CONFIG_ERROR,
    INTERRUPTED,
    SURPLUS,
    counted_trials,
    write_report,
)
from src.hpo.samplers import GridSearchSampler
from src.hpo.search_space import SearchSpace, parse_search_space, value_text
from src.hpo.storage import open_storage, storage_spec
from src.hpo.trial_checkpoints import check_keep_setting, drop_checkpoints
from src.utils.errors import AutoclsError, ConfigError, find_disk_full, find_user_error

log = logging.getLogger(__name__)

WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _check_limits(settings: Mapping[str, Any]) -> None:
    n_trials, timeout = settings.get("n_trials"), settings.get("timeout")
    if n_trials is not None and (not isinstance(n_trials, int) or n_trials < 1):
        raise AutoclsError(f"hydra.sweeper.n_trials={n_trials} must be a positive whole number: the study's total of trials.")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise AutoclsError(f"hydra.sweeper.timeout={timeout} must be a positive number of seconds, or null for no limit.")


class OptunaSweep:
    def __init__(self, settings: Mapping[str, Any], *, hydra_context, task_function, config: DictConfig,
                 validate_batch: Callable[[list[list[str]]], None]) -> None:
        self.settings = settings
        self.config = config
        self.validate_batch = validate_batch
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.study_name = str(settings.get("study_name") or "autocls")
        self.objectives = _as_list(config.get("optimized_metric"))
        self.directions = self._directions(settings.get("direction") or "maximize")
        _check_limits(settings)
        self.job_idx = 0

    # --- setup -----------------------------------------------------------------------------------

    def _directions(self, direction) -> list[str]:
        if not self.objectives:
            raise AutoclsError("The sweep has no optimized_metric; set optimized_metric=<metric> (e.g. val/acc_best).")
        directions = _as_list(direction)
        if len(directions) == 1 and len(self.objectives) > 1:
            raise AutoclsError(
                f"optimized_metric names {len(self.objectives)} metrics but hydra.sweeper.direction is one "
                f"direction; give a list with one of maximize/minimize per metric."
            )
        if len(directions) != len(self.objectives):
            raise AutoclsError(
                f"hydra.sweeper.direction has {len(directions)} entries for {len(self.objectives)} "
                "optimized_metric names; give one maximize/minimize per metric."
            )
        for d in directions:
            if d not in ("maximize", "minimize"):
                raise AutoclsError(f"hydra.sweeper.direction '{d}' is neither maximize nor minimize; use one of the two per optimized_metric.")
        return directions

    def _sampler(self, space: SearchSpace, n_existing: int):
        """The configured sampler. A seeded sampler joining a study that already has trials (a resumed
        sweep, a second worker) is seeded with seed + their number: with the plain seed it would replay
        the first run's random start-up draws and repeat those trials. The grid sampler keeps its seed: it
        shuffles the grid with it, and a resumed grid must see the same order (else it repeats points)."""
        cfg = self.settings.get("sampler")
        if not cfg:
            return optuna.samplers.TPESampler()
        kwargs = _arguments(cfg)
        cls = get_class(cfg["_target_"])
        if issubclass(cls, optuna.samplers.GridSampler):
            # not re-seeded: the seed shuffles the grid, and the trials' grid ids index that order
            cls = GridSearchSampler if cls is optuna.samplers.GridSampler else cls
            kwargs.setdefault("search_space", space.grid())
        elif kwargs.get("seed") is not None and n_existing:
            kwargs["seed"] = int(kwargs["seed"]) + n_existing
        return cls(**_accepted(cls, kwargs, "hydra.sweeper.sampler"))

    def _pruner(self):
        """The pruner; its config also goes to every trial (`optuna_trial.pruner`), because a study
        re-loaded from storage has no pruner of its own and the trial's callback asks it."""
        cfg = self.settings.get("pruner")
        self.pruner_cfg = None
        if not cfg:
            return None
        raw = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}
        cls = get_class(cfg["_target_"])
        self.pruner_cfg = {"_target_": cfg["_target_"], **_accepted(cls, raw, "hydra.sweeper.pruner")}
        return instantiate(self.pruner_cfg)

    def _open_study(self, space: SearchSpace) -> optuna.Study:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.storage_url = storage_spec(self.settings.get("storage"), self.sweep_dir)
        self.storage = open_storage(self.storage_url)
        pruner = self._pruner()
        try:
            study_id = self.storage.get_study_id_from_name(self.study_name)
            n_existing = len(self.storage.get_all_trials(study_id, deepcopy=False))
        except KeyError:  # a new study
            n_existing = 0
        study = optuna.create_study(
            study_name=self.study_name, storage=self.storage, sampler=self._sampler(space, n_existing), pruner=pruner,
            directions=self.directions, load_if_exists=True,
        )
        existing = [d.name.lower() for d in study.directions]
        if existing != self.directions:
            raise AutoclsError(
                f"The study '{self.study_name}' in {self.storage_url} optimises {existing}, not "
                f"{self.directions}; pick a new hydra.sweeper.study_name (and sweep dir) for a different objective."
            )
        return study

    # --- the loop --------------------------------------------------------------------------------

    def run(self, arguments: list[str]) -> dict:
        self.keep_checkpoints = check_keep_setting(str(self.settings.get("keep_checkpoints") or "all"))
        space = parse_search_space(self.settings.get("params"), arguments)
        self.space = space
        if not space.distributions:
            raise AutoclsError("The search space is empty; add hydra.sweeper.params or sweep overrides such as "
                               "optimizer.lr=tag(log,interval(1e-4,1e-1)).")
        study = self._open_study(space)
        self._enqueue(study, space)
        n_trials = self._n_trials(study, space)
        self._check_overrides_compose(space)
        self._reclaim_orphans(study)
        n_jobs = max(1, int(self.settings.get("n_jobs") or 1))
        timeout = self.settings.get("timeout")
        start = time.monotonic()
        log.info(f"Study '{self.study_name}' ({', '.join(f'{d} {o}' for d, o in zip(self.directions, self.objectives))}) "
                 f"in {self.storage_url}: {len(counted_trials(study))}/{n_trials} trials recorded.")
        while True:
            if timeout is not None and time.monotonic() - start > float(timeout):
                log.info(f"timeout={timeout} s reached; no new trials from this worker.")
                break
            free = n_trials - self._budget_used(study)
            if free <= 0:
                break
            batch = self._ask(study, min(n_jobs, free), n_trials)
            if not batch:
                break
            self._run_batch(study, batch)
            write_report(study, self.objectives, self.sweep_dir, plots=False, verbatim=frozenset(space.verbatim))
        results = write_report(study, self.objectives, self.sweep_dir, verbatim=frozenset(space.verbatim))
        self._log_summary(results)
        return results

    def _enqueue(self, study: optuna.Study, space: SearchSpace) -> None:
        """`enqueue`: points the sampler does not choose, tried before its own (Optuna's enqueue_trial). A rerun
        finds them tried or queued already and adds nothing."""
        for point in self.settings.get("enqueue") or []:
            point = OmegaConf.to_container(point) if isinstance(point, DictConfig) else dict(point)
            unknown = sorted(set(point) - set(space.distributions))
            if unknown:
                raise AutoclsError(f"hydra.sweeper.enqueue names {', '.join(unknown)}, which the search space does not "
                                   f"have; use keys of hydra.sweeper.params ({', '.join(sorted(space.distributions))}).")
            study.enqueue_trial(point, skip_if_exists=True)

    def _n_trials(self, study: optuna.Study, space: SearchSpace) -> int:
        n_trials = self.settings.get("n_trials")
        if isinstance(study.sampler, optuna.samplers.GridSampler):
            size = space.grid_size()
            if n_trials is None or int(n_trials) > size:
                log.info(f"Grid search: {size} points, so n_trials={size}.")
                return size
        if n_trials is None:
            raise AutoclsError("hydra.sweeper.n_trials is null; set the study's total number of trials.")
        return int(n_trials)

    def _check_overrides_compose(self, space: SearchSpace) -> None:
        """Compose one trial's config before asking Optuna for anything: a key the config lacks fails here,
        in one sentence, not in every trial."""
        sample = {k: _first_value(d) for k, d in space.distributions.items()}
        try:
            self.validate_batch([[*space.overrides(sample), *self._trial_overrides(0)]])
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0]
            raise AutoclsError(f"A trial's overrides do not compose ({reason}); fix the key in hydra.sweeper.params "
                               "or the command line.") from exc

    def _budget_used(self, study: optuna.Study) -> int:
        return sum(t.state != TrialState.WAITING for t in counted_trials(study))

    def _ask(self, study: optuna.Study, n: int, n_trials: int) -> list[optuna.trial.Trial]:
        batch = []
        for _ in range(n):
            trial = study.ask(self.space.distributions)
            trial.set_user_attr("worker", WORKER)
            trial.set_user_attr("run_dir", str(self.sweep_dir / str(trial.number)))
            batch.append(trial)
        # another worker may have asked at the same moment: the first n_trials by number are the study's
        budget = sorted(t.number for t in counted_trials(study) if t.state != TrialState.WAITING)
        allowed = set(budget[:n_trials])
        for trial in [t for t in batch if t.number not in allowed]:
            trial.set_user_attr(SURPLUS, True)
            study.tell(trial, state=TrialState.FAIL)
            batch.remove(trial)
        return batch

    def _trial_overrides(self, number: int) -> list[str]:
        ref = {"storage": self.storage_url, "study_name": self.study_name, "number": number,
               "pruner": self.pruner_cfg}
        overrides = [f"++optuna_trial={_override_text(ref)}", f"hydra.sweep.subdir={number}"]
        if "wandb" in (self.config.get("logger") or {}):  # one W&B group per sweep
            overrides += [f"logger.wandb.group={_quoted(self.study_name)}",
                          f"logger.wandb.name={_quoted(f'{self.study_name}-{number}')}"]
        return overrides

    def _run_batch(self, study: optuna.Study, batch: list[optuna.trial.Trial]) -> None:
        jobs = [[*self.space.overrides(t.params), *self._trial_overrides(t.number)] for t in batch]
        try:
            returns = self.launcher.launch(jobs, initial_job_idx=self.job_idx)
        except BaseException:  # Ctrl-C, SIGTERM, a launcher crash: keep the study consistent, then stop
            for trial in batch:
                if self._state(study, trial.number) == TrialState.RUNNING:
                    self._close_cut_short(study, trial.number, trial.params)
            raise
        self.job_idx += len(batch)
        stop: AutoclsError | None = None
        for trial, ret in zip(batch, returns):
            stop = self._tell(study, trial, ret) or stop
        if self.keep_checkpoints == "best":
            drop_checkpoints(study)
        if stop is not None:
            raise stop

    def _tell(self, study: optuna.Study, trial: optuna.trial.Trial, ret: JobReturn) -> AutoclsError | None:
        """Record one job's outcome; returns the error that should end the sweep (a metric that no trial
        would log), if any."""
        if self._state(study, trial.number) != TrialState.RUNNING:  # pruned: the callback told the storage
            log.info(f"Trial {trial.number}: {self._state(study, trial.number).name}.")
            return None
        if ret.status != JobStatus.COMPLETED:
            error = ret._return_value  # JobReturn.return_value re-raises for failed jobs
            disk_full = find_disk_full(error) if isinstance(error, BaseException) else None
            if disk_full is not None:  # every later trial would fail too: stop, and retry this one next run
                self._close_cut_short(study, trial.number, trial.params)
                where = f" writing {disk_full.filename}" if disk_full.filename else ""
                return AutoclsError(
                    f"Trial {trial.number} stopped: no space left on device{where}; "
                    "free space (hydra.sweeper.keep_checkpoints=best keeps only the best trials' checkpoints) "
                    "and rerun the same command: the sweep resumes and retries this trial.")
            user_error = find_user_error(error) if isinstance(error, BaseException) else None
            # one line for the table (Hydra's InstantiationException spreads its cause over several)
            message = str(user_error) if user_error else " ".join(f"{type(error).__name__}: {error}".split())
            trial.set_user_attr("error", message[:500])
            if isinstance(user_error, ConfigError):  # every trial would repeat it: stop the sweep
                trial.set_user_attr(CONFIG_ERROR, True)
                study.tell(trial, state=TrialState.FAIL)
                return user_error
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"Trial {trial.number} failed ({message}); the sweep continues.",
                        exc_info=None if user_error else error)
            return None
        try:
            values = self._values(ret.return_value)
        except ObjectiveNotLoggedError as exc:
            trial.set_user_attr("error", str(exc))
            trial.set_user_attr(CONFIG_ERROR, True)
            study.tell(trial, state=TrialState.FAIL)
            return exc
        if isinstance(ret.return_value, Mapping) and "epochs" in ret.return_value:
            trial.set_user_attr("epochs", int(ret.return_value["epochs"]))
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr("error", f"non-finite objective {values}")
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"Trial {trial.number} returned {values}; recorded as failed.")
            return None
        study.tell(trial, values)
        shown = ", ".join(f"{o}={v:.4g}" for o, v in zip(self.objectives, values))
        log.info(f"Trial {trial.number} finished: {shown}  params={trial.params}")
        return None

    def _values(self, returned: Any) -> list[float]:
        """The objectives from what the task returned: a metrics mapping (src.train.train), one number,
        or a sequence in `optimized_metric` order."""
        if isinstance(returned, Mapping):
            missing = [o for o in self.objectives if o not in returned]
            if missing:
                numeric = [k for k, v in returned.items() if isinstance(v, (int, float))]
                raise missing_metric_error(missing[0], numeric, "optimized_metric")
            return [float(returned[o]) for o in self.objectives]
        if isinstance(returned, (int, float)) and len(self.objectives) == 1:
            return [float(returned)]
        if isinstance(returned, Sequence) and not isinstance(returned, str) and len(returned) == len(self.objectives):
            return [float(v) for v in returned]
        raise ObjectiveNotLoggedError(
            f"The task returned {returned!r}, which holds no value for optimized_metric={self.objectives}; "
            "return train()'s metrics dict (train.py does) or one number per optimized metric."
        )

    # --- trials cut short ------------------------------------------------------------------------

    def _trial_id(self, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(self.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def _state(self, study: optuna.Study, number: int) -> TrialState:
        return self._frozen(study, number).state

    def _frozen(self, study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
        return self.storage.get_trial(self._trial_id(number))

    def _live(self, study: optuna.Study, number: int) -> optuna.trial.Trial:
        """A handle that can still write to a RUNNING trial (user attrs, tell)."""
        return optuna.trial.Trial(study, self._trial_id(number))

    def _reclaim_orphans(self, study: optuna.Study) -> None:
        """Trials left RUNNING by a worker of this machine that no longer exists were cut short."""
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = str(frozen.user_attrs.get("worker", ""))
            host, _, pid = worker.rpartition(":")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                self._close_cut_short(study, frozen.number, frozen.params)

    def _close_cut_short(self, study: optuna.Study, number: int, params: dict) -> None:
        trial = self._live(study, number)
        values = self._values_from_run_dir(self._frozen(study, number))
        if values is not None:
            study.tell(trial, values)
            log.info(f"Trial {number} had finished before the interruption; took its values from metrics.json.")
            return
        trial.set_user_attr(INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(params)
        log.warning(f"Trial {number} was cut short; its parameters are queued for the next run.")

    def _values_from_run_dir(self, frozen) -> list[float] | None:
        path = Path(str(frozen.user_attrs.get("run_dir", ""))) / "metrics.json"
        started = frozen.datetime_start.timestamp() if frozen.datetime_start else 0.0
        if not path.is_file() or path.stat().st_mtime < started:
            return None
        try:
            metrics = json.loads(path.read_text())
            return self._values(metrics)
        except (ValueError, AutoclsError):
            return None

    def _log_summary(self, results: dict) -> None:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in results["n_trials"].items())
        if "best_params" in results:
            log.info(f"Best trial {results['best_trial']}: {self.objectives[0]}={results['best_value']:.4g} "
                     f"with {' '.join(results['best_overrides'])}")
        elif results.get("pareto_front"):
            log.info(f"Pareto front: {len(results['pareto_front'])} trials")
        log.info(f"Trials: {counts}. Results in {self.sweep_dir} (trials.csv, optimization_results.yaml, *.png)")


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (ListConfig, list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _arguments(cfg: DictConfig) -> dict:
    """A sampler's or pruner's constructor arguments; nested `_target_` nodes (an NSGA-II crossover, a
    sampler inside a pruner) are built by Hydra."""
    return {k: instantiate(v) if isinstance(v, dict) and "_target_" in v else v
            for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}


def _accepted(cls: type, kwargs: dict, where: str) -> dict:
    """The settings `cls` takes. A search config tunes its sampler and pruner (`n_startup_trials: 4`);
    switching the group on the command line (`hydra/sweeper/sampler=random`) keeps those keys, which
    the new class may not have: they are dropped with a log line instead of failing the sweep."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    dropped = sorted(k for k in kwargs if k not in params)
    if dropped:
        log.info(f"{where}: {cls.__name__} has no {', '.join(dropped)}; ignored.")
    return {k: v for k, v in kwargs.items() if k in params}


def _override_text(value: Any) -> str:
    """Plain data (dicts, lists, scalars) as a Hydra override value."""
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_override_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_text(v) for v in value) + "]"
    if isinstance(value, str):
        return _quoted(value)
    return value_text(value)


def _quoted(text: str) -> str:
    """A string as a quoted Hydra override value (paths and URLs hold ':' and '/')."""
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _first_value(dist):
    return dist.choices[0] if isinstance(dist, optuna.distributions.CategoricalDistribution) else dist.low


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

