"""Prometheus metrics of the inference path, shared by every engine.

Defined once at import (prometheus-client registries reject duplicates), so
engines, the API and the bot just update them; ``METRICS_PORT`` exposes them.

Two owners, so nothing is counted twice:

- :class:`CountedEngine`, the Engine boundary that
  :func:`~bot.serving.factory.build_engine` puts around every backend, counts
  what a caller sees of each request: :data:`ANSWERS` (by variant and outcome,
  failures included), :data:`GENERATED_TOKENS`, :data:`FIRST_TOKEN_SECONDS` and
  :data:`TOKENS_PER_SECOND`. A local "queue full" and a remote 429 are both
  ``outcome="busy"`` because both reach the caller as ``EngineBusy``.
- The backends count only what they alone can see: the local worker its
  scheduling (:data:`QUEUE_DEPTH`, :data:`BATCH_SIZE`, :data:`QUEUE_SECONDS`,
  :data:`GPU_MEMORY_BYTES`), the OpenAI engine its requests in flight
  (:data:`QUEUE_DEPTH`), and both :data:`ERRORS` by kind.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence

from prometheus_client import Counter, Gauge, Histogram

from bot.serving.adapters import FINETUNED
from bot.serving.engine import (
    VARIANTS,
    Answer,
    EngineBusy,
    EngineTimeout,
    EngineUnavailable,
    EngineWrapper,
    Message,
    OnText,
    Sampling,
    Variant,
)

QUEUE_DEPTH = Gauge("freeski_queue_depth", "Requests waiting for the inference worker")
BATCH_SIZE = Histogram(
    "freeski_batch_size", "Rows per decoding step", buckets=(1, 2, 4, 8, 16, 32, 64)
)
RUNNING_ROWS = Gauge("freeski_running_rows", "Rows in the local worker's running batch")
BATCH_TOKENS = Gauge(
    "freeski_batch_tokens",
    "Cache slots the running batch holds: rows times the longest row, padding included",
)
QUEUE_SECONDS = Histogram(
    "freeski_queue_seconds",
    "Time a request waited before its batch started",
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FIRST_TOKEN_SECONDS = Histogram(
    "freeski_time_to_first_token_seconds",
    "Time from accepting a request to its first streamed text",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
GENERATED_TOKENS = Counter("freeski_generated_tokens_total", "Tokens generated", ["variant"])
TOKENS_PER_SECOND = Gauge(
    "freeski_tokens_per_second", "Generation throughput over the recent window"
)
ANSWERS = Counter("freeski_answers_total", "Finished requests", ["variant", "outcome"])
ERRORS = Counter("freeski_errors_total", "Errors by kind", ["kind"])
GPU_MEMORY_BYTES = Gauge("freeski_gpu_memory_allocated_bytes", "CUDA memory allocated by torch")


def outcome_of(result: Answer | BaseException) -> str:
    """The ``outcome`` label of :data:`ANSWERS` for a request that ended with ``result``.

    An answer is labelled by how it finished (``stop``, ``length``,
    ``cancelled``); a failure by its kind (``busy``, ``timeout``,
    ``unavailable``, ``cancelled``, ``error``). One mapping for every engine,
    so a dashboard reads the same whichever backend answers.
    """
    if isinstance(result, Answer):
        return result.finish_reason
    if isinstance(result, EngineBusy):
        return "busy"
    if isinstance(result, EngineTimeout):
        return "timeout"
    if isinstance(result, EngineUnavailable):
        return "unavailable"
    if isinstance(result, asyncio.CancelledError):
        return "cancelled"
    return "error"


class RecentRate:
    """Tokens per second over a sliding window: ``/status`` and :data:`TOKENS_PER_SECOND`.

    A window rather than a lifetime average, so an idle hour does not hide
    what the engine does now. Not thread-safe: the local worker calls it
    under its own lock.
    """

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int) -> None:
        self._events.append((time.monotonic(), tokens))

    def per_second(self) -> float:
        now = time.monotonic()
        while self._events and now - self._events[0][0] > self.window_s:
            self._events.popleft()
        if not self._events:
            return 0.0
        span = max(now - self._events[0][0], 1.0)
        return sum(tokens for _, tokens in self._events) / span


UNKNOWN_MODEL = "unknown"  # the label of answers asked of a name that is not served


class CountedEngine(EngineWrapper):
    """An :class:`~bot.serving.engine.Engine` that counts every request once, at the boundary.

    It wraps any backend and forwards everything; what it adds is the
    per-request metrics listed in this module's docstring, taken from the
    :class:`~bot.serving.engine.Answer` or the exception the caller gets. A
    ``compare`` counts one answer per variant; when it fails, both variants
    count that failure (they were asked together and end together).
    """

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        variant: Variant = FINETUNED,
        max_new_tokens: int | None = None,
        on_text: OnText | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,
    ) -> Answer:
        try:
            answer = await self.inner.generate(
                messages,
                variant=variant,
                max_new_tokens=max_new_tokens,
                on_text=on_text,
                sampling=sampling,
                grounding=grounding,
            )
        except (Exception, asyncio.CancelledError) as error:
            ANSWERS.labels(self._label(variant), outcome_of(error)).inc()
            raise
        self._count(answer)
        return answer

    async def compare(
        self,
        messages: Sequence[Message],
        *,
        models: tuple[Variant, Variant] = VARIANTS,
        max_new_tokens: int | None = None,
        on_text: Callable[[Variant, str], None] | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,
    ) -> tuple[Answer, Answer]:
        try:
            first, second = await self.inner.compare(
                messages,
                models=models,
                max_new_tokens=max_new_tokens,
                on_text=on_text,
                sampling=sampling,
                grounding=grounding,
            )
        except (Exception, asyncio.CancelledError) as error:
            for variant in models:
                ANSWERS.labels(self._label(variant), outcome_of(error)).inc()
            raise
        self._count(first)
        self._count(second)
        return first, second

    def _label(self, model: Variant) -> str:
        """A metric label for ``model``: a served name, or "unknown" for any other, so a
        client asking for made-up names cannot grow the metrics without bound."""
        return model if model in self.inner.models().names else UNKNOWN_MODEL

    def _count(self, answer: Answer) -> None:
        ANSWERS.labels(answer.variant, outcome_of(answer)).inc()
        if answer.completion_tokens:
            GENERATED_TOKENS.labels(answer.variant).inc(answer.completion_tokens)
        if answer.first_token_s is not None:
            FIRST_TOKEN_SECONDS.observe(answer.first_token_s)
        # The backend's own window, so the gauge and /status show the same number.
        TOKENS_PER_SECOND.set(self.inner.status().tokens_per_s)
