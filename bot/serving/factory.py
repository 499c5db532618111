"""Build the configured :class:`~bot.serving.engine.Engine`; the one place that knows the backends.

The local engine is imported only when it is chosen: a bot that answers
through a vLLM server never imports torch.
"""

from __future__ import annotations

from bot.serving.engine import Engine
from bot.serving.settings import EngineSettings


def build_engine(settings: EngineSettings) -> Engine:
    """The engine ``INFERENCE_BACKEND`` names, not yet started."""
    if settings.backend == "openai":
        from bot.serving.openai_engine import OpenAIEngine

        return OpenAIEngine(settings)
    if settings.backend == "local":
        from bot.serving.local_engine import LocalEngine

        return LocalEngine(settings)
    raise ValueError(f"unknown inference backend {settings.backend!r}")
