"""argparse, but a usage mistake is one ``error: …`` line like every other failure.

argparse prints the whole usage text and exits on a bad option; raising
:class:`~freeski_common.errors.UserError` instead lets
:func:`~freeski_common.errors.cli_entry` report it the same way as a bad
setting, and lets tests catch it.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from freeski_common.errors import UserError


class OneLineErrors:
    """Mix into any ``argparse.ArgumentParser`` subclass (trl's parser too) before it."""

    prog: str

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose subcommand parsers inherit the one-line errors."""
