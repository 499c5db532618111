"""A scripted :class:`~bot.serving.engine.Engine` for testing what sits on top of engines.

Its answers are words derived from the question, streamed one per step, so a
test can tell which question and which variant an answer belongs to without
a model. Failures are queued up front and raised by the next requests.

It samples as an engine must: at temperature 0 the words keep their order; above
it their order is drawn, from the request's ``seed`` when it has one, so a test
sees whether a request's sampling reached the engine.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Sequence

from bot.serving.adapters import FINETUNED, ServedAdapter, ServedModels
from bot.serving.engine import (
    VARIANTS,
    Answer,
    EngineStatus,
    EngineUnavailable,
    Message,
    OnText,
    RuntimeUpdatesUnsupported,
    Sampling,
    UnknownModel,
    Variant,
)


def scripted_words(
    messages: Sequence[Message],
    variant: Variant,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[str]:
    """The full answer, word by word: the variant's name, then the last question's words.

    Sampled (``temperature`` above 0), the question's words come in an order drawn
    from ``seed``, or from fresh randomness without one.
    """
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    words = question.split() or ["nothing"]
    if variant == "finetuned":
        words = list(reversed(words))
    if temperature > 0:
        random.Random(seed).shuffle(words)
    return [f"{variant}:", *words, "end."]


class ScriptedEngine:
    backend = "scripted"

    def __init__(
        self, *, step_s: float = 0.0, max_new_tokens: int = 64, temperature: float = 0.0
    ) -> None:
        self.step_s = step_s
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature  # the operator's, for requests that name none
        self.samplings: list[Sampling | None] = []  # each request's, beside self.requests
        self.failures: list[BaseException] = []  # raised by the next requests, first first
        self.fail_after_words: tuple[int, BaseException] | None = None
        self.requests: list[tuple[Variant, list[Message], int | None]] = []
        self.cancelled = 0
        self.was_cancelled = asyncio.Event()
        self.in_flight = 0
        self.ready = False
        self._served = 0
        self._tokens = 0
        self._started_at = time.monotonic()

    async def start(self) -> None:
        self.ready = True

    async def close(self) -> None:
        self.ready = False

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        variant: Variant = "finetuned",
        max_new_tokens: int | None = None,
        on_text: OnText | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,
    ) -> Answer:
        if not self.ready:
            raise EngineUnavailable("The scripted engine is stopped.")
        if variant not in self.models().names:
            raise UnknownModel(f"no model is served as {variant!r}")
        self.requests.append((variant, list(messages), max_new_tokens))
        self.samplings.append(sampling)
        if self.failures:
            raise self.failures.pop(0)
        started = time.monotonic()
        limit = min(max_new_tokens or self.max_new_tokens, self.max_new_tokens)
        asked = sampling or Sampling()
        temperature = self.temperature if asked.temperature is None else asked.temperature
        words = scripted_words(messages, variant, temperature=temperature, seed=asked.seed)
        pieces = [word if i == 0 else f" {word}" for i, word in enumerate(words[:limit])]
        first_token_s = None
        self.in_flight += 1
        try:
            for i, piece in enumerate(pieces):
                await asyncio.sleep(self.step_s)
                if self.fail_after_words and i == self.fail_after_words[0]:
                    raise self.fail_after_words[1]
                if first_token_s is None:
                    first_token_s = time.monotonic() - started
                if on_text is not None:
                    on_text(piece)
        except asyncio.CancelledError:
            self.cancelled += 1
            self.was_cancelled.set()
            raise
        finally:
            self.in_flight -= 1
        self._served += 1
        self._tokens += len(pieces)
        return Answer(
            text="".join(pieces),
            variant=variant,
            finish_reason="length" if len(words) > limit else "stop",
            prompt_tokens=sum(len(m["content"].split()) for m in messages),
            completion_tokens=len(pieces),
            first_token_s=first_token_s,
            total_s=time.monotonic() - started,
        )

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
        first, second = await asyncio.gather(
            *(
                self.generate(
                    messages,
                    variant=variant,
                    max_new_tokens=max_new_tokens,
                    on_text=None if on_text is None else (lambda t, v=variant: on_text(v, t)),
                    sampling=sampling,
                )
                for variant in models
            )
        )
        return first, second

    def models(self) -> ServedModels:
        return ServedModels((ServedAdapter(FINETUNED, "scripted-adapter"),), FINETUNED)

    async def load_adapter(self, name: str, path: str | os.PathLike[str]) -> ServedAdapter:
        raise RuntimeUpdatesUnsupported("the scripted engine serves one scripted adapter")

    async def unload_adapter(self, name: str) -> None:
        raise RuntimeUpdatesUnsupported("the scripted engine serves one scripted adapter")

    async def set_default(self, name: str) -> ServedModels:
        raise RuntimeUpdatesUnsupported("the scripted engine serves one scripted adapter")

    def status(self) -> EngineStatus:
        return EngineStatus(
            backend=self.backend,
            model="scripted-base",
            adapter="scripted-adapter",
            device="none",
            ready=self.ready,
            queue_depth=self.in_flight,
            queue_size=64,
            max_batch=8,
            batches_served=self._served,
            requests_served=self._served,
            tokens_generated=self._tokens,
            tokens_per_s=0.0,
            uptime_s=time.monotonic() - self._started_at,
        )
