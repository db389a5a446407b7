"""Where a study lives: a journal file (the default, safe for several processes on one file system),
an SQLite file, or any database URL that SQLAlchemy opens (PostgreSQL, MySQL) for workers on many machines."""

from __future__ import annotations

from pathlib import Path

import optuna

from src.utils.errors import AutoclsError

JOURNAL_FILE = "optuna.journal"
SQLITE_FILE = "optuna.db"


def storage_spec(setting: str | None, sweep_dir: str | Path) -> str:
    """The sweeper's `storage` setting as one string that every trial process can reopen:
    null -> `<sweep dir>/optuna.journal`, `sqlite` -> `sqlite:///<sweep dir>/optuna.db`, a URL as given,
    anything else a journal file path (made absolute)."""
    sweep_dir = Path(sweep_dir).resolve()
    if setting in (None, "", "journal"):
        return str(sweep_dir / JOURNAL_FILE)
    if setting == "sqlite":
        return f"sqlite:///{sweep_dir / SQLITE_FILE}"
    if "://" in setting:
        return setting
    return str(Path(setting).expanduser().resolve())


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """The storage behind `spec` (see `storage_spec`); one sentence when it cannot be opened."""
    try:
        if "://" in spec:
            return optuna.storages.RDBStorage(spec)
        path = Path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    except Exception as exc:  # SQLAlchemy/driver/OS errors: the user gave a storage we cannot use
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AutoclsError(
            f"Cannot open the Optuna storage '{spec}' ({type(exc).__name__}: {reason}); set hydra.sweeper.storage "
            "to a reachable database URL (e.g. sqlite:////abs/path/study.db), a writable journal file path, "
            "or leave it unset for a journal file in the sweep directory."
        ) from exc


def load_trial(spec: str, study_name: str, number: int,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.trial.Trial:
    """Trial `number` of a running study, re-attached from its storage (inside a launcher's job process,
    which shares no Python objects with the sweeper). Storage keeps no pruner: pass the sweep's."""
    storage = open_storage(spec)
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
    return optuna.trial.Trial(study, trial_id)
