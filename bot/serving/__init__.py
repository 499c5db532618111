"""The serving core: everything between a question and its answer, for every front end.

Front ends (the Discord bot, the HTTP API, the console) talk to an
:class:`~bot.serving.engine.Engine` and nothing else. Two implementations:

- :class:`~bot.serving.local_engine.LocalEngine` over the
  :mod:`~bot.serving.worker` — one thread owns one quantized model and its
  named adapters (:mod:`~bot.serving.adapters`), rows of any of them batched
  together; the worker schedules and loads or unloads adapters between steps
  (which names answer: :mod:`~bot.serving.served_adapters`),
  its :mod:`~bot.serving.model_runner` runs each step, applying each row's
  adapter with :mod:`~bot.serving.batched_lora`;
- :class:`~bot.serving.openai_engine.OpenAIEngine` — any OpenAI-compatible
  server (vLLM with the adapter as a LoRA module, or another Freeski bot).

:func:`~bot.serving.factory.build_engine` builds the one ``INFERENCE_BACKEND``
names, wrapped in :class:`~bot.serving.metrics.CountedEngine`, the boundary
that counts every answer once whichever backend gave it.

Also here: what the model sees of a conversation (:mod:`~bot.serving.context`:
the system prompt, trimming), the metrics and their endpoint, the engine and
process settings and the environment readers every front end's settings use
(:mod:`~bot.serving.env`). This package imports nothing of discord.py,
aiohttp's web server or any front end (``tests/test_layers.py`` checks); model
loading comes from ``finetune``.
"""
