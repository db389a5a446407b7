"""The boundary between a task function and the user's terminal."""

from __future__ import annotations

import difflib
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from src.utils.errors import AutoclsError, find_user_error


def user_errors_as_messages(task: Callable) -> Callable:
    """Run `task`; a mistake the user can fix (an `AutoclsError`, also when Hydra's instantiate wrapped
    it) ends the program with its one-sentence message and exit code 2 instead of a traceback."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as exc:
            user_error = find_user_error(exc)
            if user_error is None:
                raise
            print(f"Error: {user_error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def print_report(text: str, out: Path | None = None) -> None:
    """Print a script's (markdown) report; also write it to `out`, a script's --out file, when given."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def reject_unknown_options(argv: Sequence[str], config_file: str | Path) -> None:
    """For scripts whose options are the top-level keys of one config: an override of a key that is
    not there (`topkk=3`) becomes one sentence naming the close options, instead of Hydra's
    multi-line "Could not override" block. Config groups (`paths.*`), `hydra.*`, flags and explicit
    `+key=`/`~key` overrides are left to Hydra."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(config_file))
    groups = {name for entry in cfg.get("defaults", []) if isinstance(entry, dict) for name in entry}
    known = {str(k) for k in cfg if k != "defaults"} | {g.split("/")[0] for g in groups} | {"hydra"}
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if key.split(".")[0].split("/")[0] in known:
            continue
        close = difflib.get_close_matches(key, sorted(known - {"hydra", "paths"}), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        options = ", ".join(sorted(known - {"hydra", "paths"}))
        raise AutoclsError(f"Unknown option '{key}'{hint}; the options of {Path(config_file).name} are {options}.")
