"""The bot: serves base and finetuned answers from one model to several front ends.

Layers, and the only direction imports go:

- front ends — :mod:`bot.discord_bot` (Discord), :mod:`bot.api` (OpenAI-compatible
  HTTP), :mod:`bot.console` (a terminal chat);
- the serving core — :mod:`bot.serving` (Engine interface, local worker,
  OpenAI-compatible engine, context trimming, metrics);
- model loading — :mod:`finetune.modeling` and :mod:`finetune.generation`.

:mod:`bot.demo` drives the whole pipeline (crawl → finetune → serving) for
``make demo``; it lives here because the bot is the last stage, the only one
allowed to use all three.
"""
