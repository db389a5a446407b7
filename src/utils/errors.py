"""The one exception type for mistakes a user can fix.

Anything that a user can cause (a missing path, a wrong override, a checkpoint for another class
count) raises `AutoclsError` with a single sentence that says what is wrong and how to fix it. The
entry points print that sentence instead of a traceback; everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import difflib
import errno
import re


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
        setting_error = _unknown_setting(error)
        if setting_error is not None:
            return setting_error
    return None


def _unknown_setting(error: BaseException) -> ConfigError | None:
    """A config node whose `_target_` refuses one of its keys (a misspelled or appended `+key=value`):
    Hydra's InstantiationException around `__init__() got an unexpected keyword argument 'x'` becomes
    one sentence naming `<node>.x`, with the target's close parameter names."""
    from hydra.errors import InstantiationException

    cause = error.__cause__
    if not isinstance(error, InstantiationException) or not isinstance(cause, TypeError):
        return None
    node = re.search(r"full_key: (\S+)", str(error))
    target = re.search(r"Error in call to target '([^']+)'", str(error))
    unexpected = re.search(r"__init__\(\) got an unexpected keyword argument '(\w+)'", str(cause))
    if not (node and target and unexpected):
        return None
    node, target, name = node.group(1), target.group(1), unexpected.group(1)
    close = difflib.get_close_matches(name, _parameter_names(target), n=2)
    hint = f" (did you mean {' or '.join(f'{node}.{c}' for c in close)}?)" if close else ""
    return ConfigError(f"{node}.{name} is not a setting of {target.rsplit('.', 1)[-1]}{hint}; fix its spelling or "
                       f"remove it with ~{node}.{name}.")


def _parameter_names(target: str) -> list[str]:
    """The keyword parameters `target` (a dotted path to a class or function) takes, along its classes'
    `__init__`s; [] when it cannot be imported or inspected."""
    import importlib
    import inspect

    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        return []
    functions = [cls.__init__ for cls in inspect.getmro(obj) if "__init__" in vars(cls)] if inspect.isclass(obj) else [obj]
    names = []
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            continue
        names += [p.name for p in parameters if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return list(dict.fromkeys(names))


def find_disk_full(exc: BaseException | None) -> OSError | None:
    """The "no space left on device" error behind `exc`, if that is what stopped it."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
