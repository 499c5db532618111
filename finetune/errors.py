"""finetune's name for the product's one-line errors (see :mod:`freeski_common.errors`).

Every finetune module raises :class:`UserError` for a failure the user can
fix; ``python -m finetune`` reports it as one ``error: …`` line. The type is
shared with the other stages, so one ``except UserError`` catches them all.
"""

from freeski_common.errors import EXIT_USER_ERROR, UserError, cli_entry

__all__ = ["EXIT_USER_ERROR", "UserError", "cli_entry"]
