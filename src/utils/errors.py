"""The one exception type for mistakes a user can fix.

Anything that a user can cause (a missing path, a wrong override, a checkpoint for another class
count) raises `AutoclsError` with a single sentence that says what is wrong and how to fix it. The
entry points print that sentence instead of a traceback; everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class AutoclsError(Exception):
    """A user-fixable error; `str(err)` is one sentence that names the fix."""


class ConfigError(AutoclsError):
    """A mistake in the run's config that every run composed from it repeats (an input file that is not
    there, a search space that does not fit the network): a sweep stops at the first trial that raises
    it instead of recording the same failure for every trial."""


def find_user_error(exc: BaseException | None) -> AutoclsError | None:
    """Return the `AutoclsError` behind `exc`, looking through wrappers such as Hydra's
    `InstantiationException` (which re-raises with `from`), or None if there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, AutoclsError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
