"""Failures the operator can act on, and the one place that turns them into one line.

:class:`CrawlError` is the product's :class:`~freeski_common.errors.UserError`
(``freeski_common`` sits below every stage, so ``crawl`` still imports nothing
from the later ones); it keeps its own name so that crawl's callers and tests
can tell a crawl failure from any other.
"""

from __future__ import annotations

from freeski_common.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from freeski_common.errors import cli_entry as _cli_entry

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "CrawlError", "cli_entry"]


class CrawlError(UserError):
    """An expected failure (bad option, unreachable forum, missing store); its message is the report."""


# Ctrl-C loses nothing: every page is stored as it arrives.
cli_entry = _cli_entry(
    interrupted="interrupted: what was stored is kept; run the same command to continue"
)
