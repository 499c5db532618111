"""Build the configured :class:`~bot.serving.engine.Engine`; the one place that knows the backends.

The local engine is imported only when it is chosen: a bot that answers
through a vLLM server never imports torch. Whichever it is, it gets the same
boundary (:func:`around`), outermost first:

- :class:`~bot.serving.metrics.CountedEngine`, so every backend's answers are
  counted once and the same way;
- :class:`~bot.serving.context.SystemPrompted` when ``SYSTEM_PROMPT`` is set,
  the one place the operator's system prompt is applied;
- :class:`~bot.serving.grounding.GroundedEngine` when ``FORUM_DB`` is set, the
  one place the forum's passages are laid into the question.

So the local worker and an OpenAI-compatible server are sent the same final
conversation, and the counts see the grounded answer.
"""

from __future__ import annotations

import logging

from bot.serving.context import SystemPrompted
from bot.serving.engine import Engine
from bot.serving.metrics import CountedEngine
from bot.serving.settings import EngineSettings

log = logging.getLogger(__name__)


def build_engine(settings: EngineSettings) -> CountedEngine:
    """The engine ``INFERENCE_BACKEND`` names, not yet started."""
    return around(_backend(settings), settings)


def around(backend: Engine, settings: EngineSettings) -> CountedEngine:
    """``backend`` inside the boundary every engine answers through (this module's docstring)."""
    engine = backend
    if settings.forum_db is not None:
        from bot.serving.grounding import GroundedEngine

        engine = GroundedEngine.from_settings(engine, settings)
    else:
        log.warning(
            "grounding off: FORUM_DB is not set, answers come without forum sources "
            "(set FORUM_DB to a crawled store to ground them)"
        )
    if settings.system_prompt:
        engine = SystemPrompted(engine, settings.system_prompt)
    return CountedEngine(engine)


def _backend(settings: EngineSettings) -> Engine:
    if settings.backend == "openai":
        from bot.serving.openai_engine import OpenAIEngine

        return OpenAIEngine(settings)
    if settings.backend == "local":
        from bot.serving.local_engine import LocalEngine

        return LocalEngine(settings)
    raise ValueError(f"unknown inference backend {settings.backend!r}")
