"""Build the configured :class:`~bot.serving.engine.Engine`; the one place that knows the backends.

The local engine is imported only when it is chosen: a bot that answers
through a vLLM server never imports torch. Whichever it is, it comes wrapped
in :class:`~bot.serving.metrics.CountedEngine`, so every backend's answers are
counted once and the same way; with ``FORUM_DB`` set, inside that, in
:class:`~bot.serving.grounding.GroundedEngine`, so every backend is grounded
the same way and the counts see the grounded answer.
"""

from __future__ import annotations

import logging

from bot.serving.engine import Engine
from bot.serving.metrics import CountedEngine
from bot.serving.settings import EngineSettings

log = logging.getLogger(__name__)


def build_engine(settings: EngineSettings) -> CountedEngine:
    """The engine ``INFERENCE_BACKEND`` names, not yet started."""
    backend = _backend(settings)
    if settings.forum_db is not None:
        from bot.serving.grounding import GroundedEngine

        backend = GroundedEngine.from_settings(backend, settings)
    else:
        log.warning(
            "grounding off: FORUM_DB is not set, answers come without forum sources "
            "(set FORUM_DB to a crawled store to ground them)"
        )
    return CountedEngine(backend)


def _backend(settings: EngineSettings) -> Engine:
    if settings.backend == "openai":
        from bot.serving.openai_engine import OpenAIEngine

        return OpenAIEngine(settings)
    if settings.backend == "local":
        from bot.serving.local_engine import LocalEngine

        return LocalEngine(settings)
    raise ValueError(f"unknown inference backend {settings.backend!r}")
