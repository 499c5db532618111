"""The feedback store for the event loop: every call runs on one worker thread.

SQLite writes can wait on a lock or the disk; a Discord bot that waits on the
event loop misses its 3 s interaction deadline and its gateway heartbeats.
One thread (not a pool) also keeps calls in the order they were made, so a
vote submitted right after its answer's record always finds the answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from bot.feedback.leaderboard import Leaderboard, read_leaderboard
from bot.feedback.records import (
    AdapterRef,
    AnswerCounts,
    AnswerRecord,
    AnswerVote,
    FeedbackSummary,
    PairCounts,
    PairVote,
    Rating,
    StoredAnswer,
    StoredPair,
    VoteChoice,
)
from bot.feedback.store import FeedbackStore

T = TypeVar("T")

log = logging.getLogger(__name__)


class AsyncFeedbackStore:
    """Awaitable mirror of :class:`FeedbackStore`; same arguments, results and exceptions.

    Build it with :meth:`open` (which creates the database off the loop) or
    around an existing store. ``record_*_soon`` schedule a write and return at
    once, for callers that must not wait even for the thread hand-off result.
    """

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-db")
        self._pending: set[asyncio.Future[object]] = set()

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, salt: bytes | None = None
    ) -> AsyncFeedbackStore:
        store = await asyncio.to_thread(FeedbackStore, path, salt=salt)
        return cls(store)

    def _submit(self, func: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Hand ``func`` to the thread now, so calls run in the order they were made."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, partial(func, *args))

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        return await self._submit(func, *args)

    async def record_answer(self, record: AnswerRecord) -> str:
        return await self._run(self.store.record_answer, record)

    async def record_pair(
        self, a: AnswerRecord, b: AnswerRecord, pair_id: str | None = None
    ) -> str:
        return await self._run(self.store.record_pair, a, b, pair_id)

    async def pair_recorded(
        self, a_answer_id: str, b_answer_id: str, pair_id: str | None = None
    ) -> str:
        return await self._run(self.store.pair_recorded, a_answer_id, b_answer_id, pair_id)

    async def pair_answers(
        self, base_answer_id: str, finetuned_answer_id: str, pair_id: str | None = None
    ) -> str:
        return await self._run(
            self.store.pair_answers, base_answer_id, finetuned_answer_id, pair_id
        )

    async def vote_answer(self, answer_id: str, voter: str, rating: Rating) -> AnswerVote:
        return await self._run(self.store.vote_answer, answer_id, voter, rating)

    async def vote_pair(self, pair_id: str, voter: str, choice: VoteChoice) -> PairVote:
        return await self._run(self.store.vote_pair, pair_id, voter, choice)

    async def answer_counts(self, answer_id: str) -> AnswerCounts:
        return await self._run(self.store.answer_counts, answer_id)

    async def pair_counts(self, pair_id: str) -> PairCounts:
        return await self._run(self.store.pair_counts, pair_id)

    async def get_answer(self, answer_id: str) -> StoredAnswer:
        return await self._run(self.store.get_answer, answer_id)

    async def get_pair(self, pair_id: str) -> StoredPair:
        return await self._run(self.store.get_pair, pair_id)

    async def summary(self, adapter: AdapterRef | None = None) -> FeedbackSummary:
        return await self._run(self.store.summary, adapter)

    async def leaderboard(self) -> Leaderboard:
        """The community's leaderboard; ``.against_base()`` is each adapter's row for ``/status``."""
        return await self._run(read_leaderboard, self.store)

    def record_answer_soon(self, record: AnswerRecord) -> None:
        """Queue ``record_answer`` without waiting; a failure is logged, not raised."""
        self._track(self._submit(self.store.record_answer, record))

    def record_pair_soon(
        self, a: AnswerRecord, b: AnswerRecord, pair_id: str | None = None
    ) -> None:
        """Queue ``record_pair`` without waiting; a failure is logged, not raised."""
        self._track(self._submit(self.store.record_pair, a, b, pair_id))

    async def close(self) -> None:
        """Finish queued writes, then close the database."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._run(self.store.close)
        self._executor.shutdown(wait=True)

    def _track(self, future: asyncio.Future[object]) -> None:
        self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[object]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("could not store feedback record", exc_info=future.exception())
