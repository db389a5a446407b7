"""The boundary between a task function and the user's terminal."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from src.utils.errors import find_user_error


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
