"""The Discord front end: mentions, reply chains, ``/ask``, ``/compare``, ``/status``.

It turns Discord events into engine calls and answers into Discord messages
(streamed edits, 2,000-character splitting, no pings). It never touches
torch: everything that answers goes through :mod:`bot.serving`.

- :mod:`~bot.discord_bot.client` — the discord.py client and its start-up.
- :mod:`~bot.discord_bot.commands` — the handlers (mentions and slash commands).
- :mod:`~bot.discord_bot.chain` — reply chains as conversation context.
- :mod:`~bot.discord_bot.replies` — where an answer is written, and its live edits.
- :mod:`~bot.discord_bot.messages` — text shaping for Discord (splitting, mentions).
- :mod:`~bot.discord_bot.settings` — ``DISCORD_*`` and the allow lists.
"""
