"""Grounded answers: the forum's passages in the prompt, and returned as the answer's sources.

One wrapper around whichever backend answers (the local worker or an
OpenAI-compatible server), applied by :func:`~bot.serving.factory.build_engine`
when ``FORUM_DB`` is set, so every front end (Discord, console, HTTP API, web
chat) is grounded the same way, as the system prompt beside it
(:class:`~bot.serving.context.SystemPrompted`) is applied the same way.

For each request the conversation's question is searched in the forum store
(:class:`crawl.search.Retriever`, read-only, beside a crawl that may be
writing) and the last user turn is rewritten with
:func:`crawl.layout.render_question`, the layout the model was trained on.
Context gives way before the question does: a prompt that does not fit is
retried with one passage fewer, down to none. Grounding never costs an
answer: a store that cannot be searched (missing, locked, older, unindexed,
empty) turns grounding off at start, with the reason in ``/status``, and is
tried again once a minute (a crawl may fill it); a search that fails
mid-answer answers that one question ungrounded, with a warning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from bot.serving.adapters import FINETUNED
from bot.serving.engine import (
    VARIANTS,
    Answer,
    Engine,
    EngineStatus,
    EngineWrapper,
    Message,
    OnText,
    RequestTooLong,
    Sampling,
    Variant,
)
from bot.serving.settings import EngineSettings
from crawl.layout import LAYOUT, render_question
from crawl.search import Passage, Retriever, query_terms
from finetune.grounding import Grounding, read_grounding
from freeski_common.errors import UserError

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_K = 3
# A last question with fewer search terms than this is a follow-up ("and how much is it?"):
# it is searched together with the user's previous turn.
FOLLOW_UP_TERMS = 3
COUNTS_REFRESH_S = 60.0  # how stale /status's passage and thread counts may get
RETRY_OPEN_S = 60.0  # a store that could not be searched is tried again this often


def adapter_grounding(adapter_path: Path | None) -> Grounding | None:
    """How the adapter was trained to read context (its run's record), None when it was not.

    An adapter trained on another layout than :data:`crawl.layout.LAYOUT` would
    read its context wrongly, so it is refused here, at start, in one line.
    """
    if adapter_path is None:
        return None
    recorded = read_grounding(adapter_path)
    if recorded is not None and recorded.layout != LAYOUT:
        raise UserError(
            f"the adapter at {adapter_path} was trained with the context layout "
            f"{recorded.layout!r} but this bot writes {LAYOUT!r}: serve it with the code it was "
            "trained with, or retrain"
        )
    return recorded


def grounding_k(settings: EngineSettings) -> int:
    """Passages per answer: ``GROUNDING_K``, else the default adapter's training ``k``, else 3.

    Every adapter's layout is checked, as each is prompted with this bot's.
    """
    for spec in settings.adapter_specs:
        adapter_grounding(spec.path)
    if settings.grounding_k is not None:
        return settings.grounding_k
    recorded = adapter_grounding(settings.default_adapter_path)
    return max(1, recorded.k) if recorded else DEFAULT_K


def search_question(messages: Sequence[Message]) -> str:
    """What to search for: the last user turn, with the previous one when it is a follow-up.

    A follow-up has fewer than :data:`FOLLOW_UP_TERMS` search terms (by
    :func:`crawl.search.query_terms`, so stopwords do not count): "and how
    much is it?" alone names nothing to search for.
    """
    asked = [m["content"] for m in messages if m["role"] == "user"]
    if not asked:
        return ""
    question = asked[-1]
    if len(asked) > 1 and len(query_terms(question)) < FOLLOW_UP_TERMS:
        return f"{asked[-2]}\n{question}"
    return question


def grounded_messages(messages: Sequence[Message], passages: Sequence[Passage]) -> list[Message]:
    """``messages`` with the last user turn rendered with ``passages`` in the shared layout."""
    out = [Message(role=m["role"], content=m["content"]) for m in messages]
    for message in reversed(out):
        if message["role"] == "user":
            message["content"] = render_question(message["content"], passages)
            break
    return out


class GroundedEngine(EngineWrapper):
    """An :class:`~bot.serving.engine.Engine` that grounds every answer on a forum store."""

    def __init__(self, inner: Engine, forum_db: Path, k: int = DEFAULT_K) -> None:
        super().__init__(inner)
        self.forum_db = Path(forum_db)
        self.k = k
        self.retriever: Retriever | None = None
        self.off_reason = "not started"
        self._counts: dict[str, int] = {}
        self._counted_at = 0.0
        self._opened_at: float | None = None  # when opening was last tried; None before start
        self._reopening = asyncio.Lock()

    @classmethod
    def from_settings(cls, inner: Engine, settings: EngineSettings) -> GroundedEngine:
        """Checks the adapter's layout now, so a mismatch stops the program before loading."""
        assert settings.forum_db is not None
        return cls(inner, settings.forum_db, grounding_k(settings))

    async def start(self) -> None:
        if self.retriever is None:
            await asyncio.to_thread(self._open)
        await self.inner.start()

    def _open(self) -> None:
        """Open the store; any reason it cannot be searched turns grounding off, with a warning."""
        self._opened_at = time.monotonic()
        try:
            retriever = Retriever.open(self.forum_db)
            counts = retriever.counts()
        except Exception as exc:  # missing, locked, older, not a store: answer as today
            self.off_reason = _one_line(exc)
            log.warning("grounding off: %s", self.off_reason)
            return
        if not counts["passages"]:
            retriever.close()
            self.off_reason = (
                f"the index of {self.forum_db} is empty: crawl the forum with "
                f"`python -m crawl fetch --db {self.forum_db}`"
            )
            log.warning("grounding off: %s", self.off_reason)
            return
        self.retriever, self._counts, self._counted_at = retriever, counts, time.monotonic()
        log.info("grounding %s", self.grounding())

    async def close(self) -> None:
        self._opened_at = None
        await self.inner.close()
        retriever, self.retriever = self.retriever, None
        if retriever is not None:
            await asyncio.to_thread(retriever.close)

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
        async def ask(prompt: list[Message]) -> Answer:
            return await self.inner.generate(
                prompt,
                variant=variant,
                max_new_tokens=max_new_tokens,
                on_text=on_text,
                sampling=sampling,
            )

        passages = await self._passages(messages) if grounding else []
        answer, used = await self._within_budget(messages, passages, ask)
        return dataclasses.replace(answer, sources=tuple(used))

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
        async def ask(prompt: list[Message]) -> tuple[Answer, Answer]:
            return await self.inner.compare(
                prompt,
                models=models,
                max_new_tokens=max_new_tokens,
                on_text=on_text,
                sampling=sampling,
            )

        passages = await self._passages(messages) if grounding else []
        (first, second), used = await self._within_budget(messages, passages, ask)
        sources = tuple(used)
        return (
            dataclasses.replace(first, sources=sources),
            dataclasses.replace(second, sources=sources),
        )

    async def _within_budget(
        self,
        messages: Sequence[Message],
        passages: list[Passage],
        ask: Callable[[list[Message]], Awaitable[T]],
    ) -> tuple[T, list[Passage]]:
        """Ask with all ``passages``, then with one fewer each time the prompt is too long."""
        while True:
            prompt = grounded_messages(messages, passages) if passages else list(messages)
            try:
                return await ask(prompt), passages
            except RequestTooLong:
                if not passages:
                    raise  # the question alone is too long: the asker's to shorten
                passages = passages[:-1]
                log.info("prompt too long: retrying with %d passages", len(passages))

    async def _passages(self, messages: Sequence[Message]) -> list[Passage]:
        """The top ``k`` passages for the conversation's question; none when search fails."""
        question = search_question(messages)
        if not question.strip():
            return []
        if self.retriever is None:
            await self._reopen()
        retriever = self.retriever
        if retriever is None:
            return []
        try:
            return await asyncio.to_thread(self._search, retriever, question)
        except Exception as exc:  # a locked or rebuilt store: this answer goes on ungrounded
            log.warning("forum search failed, answering without sources: %s", _one_line(exc))
            return []

    async def _reopen(self) -> None:
        """Try the store again, at most every ``RETRY_OPEN_S``: a crawl may have filled it since."""
        opened_at = self._opened_at
        if opened_at is None or time.monotonic() - opened_at < RETRY_OPEN_S:
            return
        async with self._reopening:
            if self.retriever is None and self._opened_at == opened_at:
                await asyncio.to_thread(self._open)

    def _search(self, retriever: Retriever, question: str) -> list[Passage]:
        passages = retriever.search(question, self.k)
        if time.monotonic() - self._counted_at > COUNTS_REFRESH_S:  # a crawl may be adding
            self._counted_at = time.monotonic()
            self._counts = retriever.counts()
        return passages

    def grounding(self) -> str:
        """``/status``'s line: on with what it searches, or off and why."""
        if self.retriever is None:
            return f"off: {self.off_reason}"
        counts = self._counts
        return (
            f"on: {counts.get('passages', 0):,} passages in {counts.get('threads', 0):,} "
            f"threads of {self.forum_db.name}, k={self.k}"
        )

    def status(self) -> EngineStatus:
        return dataclasses.replace(self.inner.status(), grounding=self.grounding())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
