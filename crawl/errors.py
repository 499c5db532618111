"""Failures the operator can act on, and the one place that turns them into one line.

``crawl`` is the pipeline's first stage and imports nothing from the later
ones, so it keeps its own small error type instead of sharing finetune's.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class CrawlError(Exception):
    """An expected failure (bad option, unreachable forum, missing store); its message is the report."""


def cli_entry(func: F) -> F:
    """Run a CLI entry point, reporting :class:`CrawlError` as ``error: …`` on stderr, exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CrawlError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print(
                "interrupted: what was stored is kept; run the same command to continue",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED

    return wrapper  # type: ignore[return-value]
