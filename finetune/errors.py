"""Errors the user can act on, and the one place that turns them into one line.

Expected failures (a missing token, a model that is not there, a bad config
value, an empty dataset) are raised as :class:`UserError` anywhere in the
product; every ``__main__`` wraps its entry point with :func:`cli_entry` so
the user sees ``error: <what is wrong and how to fix it>`` and a non-zero exit
code instead of a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A failure the user caused and can fix; its message is the whole report."""


def cli_entry(func: F) -> F:
    """Run a CLI entry point, reporting :class:`UserError` as one line on stderr."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper  # type: ignore[return-value]
