"""The one exception type for mistakes a user can fix.

Anything that a user can cause (a missing path, a wrong override, a checkpoint for another class
count) raises `AutoclsError` with a single sentence that says what is wrong and how to fix it. The
entry points print that sentence instead of a traceback; everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno


class AutoclsError(Exception):
    """A user-fixable error; `str(err)` is one sentence that names the fix."""


class ConfigError(AutoclsError):
    """A mistake in the run's config that every run composed from it repeats (an input file that is not
    there, a search space that does not fit the network): a sweep stops at the first trial that raises
    it instead of recording the same failure for every trial."""


def _chain(exc: BaseException | None):
    """`exc` and the exceptions behind it (`raise ... from`, or raised while handling)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        yield exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__


def find_user_error(exc: BaseException | None) -> AutoclsError | None:
    """Return the `AutoclsError` behind `exc`, looking through wrappers such as Hydra's
    `InstantiationException` (which re-raises with `from`), or None if there is none. A config value
    left `???` (OmegaConf's mandatory marker) that the run needed counts as one too."""
    from omegaconf.errors import MissingMandatoryValue

    for error in _chain(exc):
        if isinstance(error, AutoclsError):
            return error
        if isinstance(error, MissingMandatoryValue):
            key = getattr(error, "full_key", None) or "a required config value"
            return AutoclsError(f"{key} has no value (it is ??? in the config); pass {key}=<value> on the command line.")
    return None


def find_disk_full(exc: BaseException | None) -> OSError | None:
    """The "no space left on device" error behind `exc`, if that is what stopped it."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
