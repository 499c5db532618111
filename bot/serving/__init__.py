"""The serving core: everything between a question and its answer, for every front end.

Front ends (the Discord bot, the HTTP API, the console) talk to an
:class:`~bot.serving.engine.Engine` and nothing else. Two implementations:

- :class:`~bot.serving.local_engine.LocalEngine` over the
  :mod:`~bot.serving.worker` — one thread owns one quantized model, base and
  finetuned rows batched together;
- :class:`~bot.serving.openai_engine.OpenAIEngine` — any OpenAI-compatible
  server (vLLM with the adapter as a LoRA module, or another Freeski bot).

Also here: context trimming (:mod:`~bot.serving.context`), metrics and their
endpoint, and the engine settings. This package imports nothing of
discord.py or aiohttp's web server; model loading comes from ``finetune``.
"""
