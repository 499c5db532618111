"""An OpenAI-compatible chat API over the bot's engine, for web front ends and other bots.

``POST /v1/chat/completions`` speaks enough of OpenAI's protocol for its
clients (and for :class:`~bot.serving.openai_engine.OpenAIEngine`, so one
Freeski bot can answer for another): models ``base`` and ``finetuned``, plain
JSON or ``stream: true`` server-sent events. It is served by the same
:class:`~bot.serving.engine.Engine` and queue as the Discord bot:
:func:`~bot.api.routes.create_app` takes a running engine, so both front ends
can live in one process and share one model.

- :mod:`bot.api.protocol` — the wire format: typed request and response bodies, errors.
- :mod:`bot.api.routes` — the aiohttp routes over a running engine.
- :mod:`bot.api.server` — ``python -m bot api``: start-up, signals, shutdown.
- :mod:`bot.api.settings` — ``API_*`` settings.
- :mod:`bot.api.access` — the bearer token, and the same-origin guard without one.
- :mod:`bot.api.feedback` / :mod:`bot.api.voters` — votes, and who a web voter is.

Sampling parameters in a request (``temperature``, ``top_p``, ``stop``, …)
are checked against the ranges OpenAI documents, then ignored: the operator's
engine settings decide them, as they do for Discord.
"""
