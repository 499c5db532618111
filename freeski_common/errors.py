"""Errors the user can act on, and the one place that turns them into one line.

Expected failures (a missing token, a model that is not there, a bad config
value, an unreachable forum) are raised as :class:`UserError` anywhere in the
product; every ``__main__`` wraps its entry point with :func:`cli_entry` so the
user sees ``error: <what is wrong and how to fix it>`` and a non-zero exit
code instead of a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast, overload

F = TypeVar("F", bound=Callable[..., int | None])

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A failure the user caused and can fix; its message is the whole report."""


@overload
def cli_entry(func: F) -> F: ...


@overload
def cli_entry(*, interrupted: str = "interrupted") -> Callable[[F], F]: ...


def cli_entry(func: F | None = None, *, interrupted: str = "interrupted") -> F | Callable[[F], F]:
    """Run a CLI entry point, reporting :class:`UserError` as one line on stderr (exit 2).

    Ctrl-C prints ``interrupted`` (a stage can say what survives, e.g. that a
    crawl continues where it stopped) and exits 130, as shells expect.
    """

    def wrap(entry: F) -> F:
        @functools.wraps(entry)
        def wrapper(*args: Any, **kwargs: Any) -> int | None:
            try:
                return entry(*args, **kwargs)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_USER_ERROR
            except KeyboardInterrupt:
                print(interrupted, file=sys.stderr)
                return EXIT_INTERRUPTED

        # functools.wraps gives the wrapper entry's name and signature at run time;
        # the type system cannot express that it is still an ``F``.
        return cast(F, wrapper)

    return wrap(func) if func is not None else wrap
