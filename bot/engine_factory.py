"""Build the configured :class:`~bot.engine.Engine`; the one place that knows the backends.

The local engine is imported only when it is chosen: a bot that answers
through a vLLM server never imports torch.
"""

from __future__ import annotations

from bot.engine import Engine
from bot.settings import EngineSettings


def build_engine(settings: EngineSettings) -> Engine:
    """The engine ``INFERENCE_BACKEND`` names, not yet started."""
    if settings.backend == "openai":
        from bot.openai_engine import OpenAIEngine

        return OpenAIEngine(settings)
    if settings.backend == "local":
        from bot.local_engine import LocalEngine

        return LocalEngine(settings)
    raise ValueError(f"unknown inference backend {settings.backend!r}")
