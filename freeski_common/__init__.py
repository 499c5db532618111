"""Plumbing that every stage's command line shares: one-line errors, usage errors, signals, HTTP.

The pipeline's stages import in one direction only (``crawl`` → ``finetune``
→ ``bot``), and ``crawl``, the first, may import nothing from the later two.
The few helpers all three need therefore cannot live in any of them; they
live here, below every stage, so each exists once:

- :mod:`freeski_common.errors` — :class:`~freeski_common.errors.UserError` and
  :func:`~freeski_common.errors.cli_entry`: an expected failure is one
  ``error: …`` line and exit code 2, never a traceback;
- :mod:`freeski_common.cli` — an argparse parser whose usage mistakes are such
  a line too;
- :mod:`freeski_common.shutdown` — SIGINT/SIGTERM as an asyncio event, for
  servers that stop cleanly;
- :mod:`freeski_common.http` — reading a ``Retry-After`` header.

Nothing here imports a stage, torch, discord.py or aiohttp.
"""
