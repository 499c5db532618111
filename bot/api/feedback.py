"""Votes through the API: ``POST /v1/feedback``, and the answers they are about.

With a feedback store (``FEEDBACK_DB``), every answer the API gives is recorded
there under its completion id (the ``id`` of the ``chat.completion`` or of its
chunks), queued before the answer's last chunk is sent, so a vote that follows
it always finds it: the store runs its calls on one thread, in order. Votes
land in the same store as the Discord buttons'; who a vote counts for is the
server's decision (:mod:`bot.api.voters`), never a field of the body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, StringConstraints, ValidationError

from bot.api.protocol import ApiError, decode_json_body
from bot.api.settings import ApiSettings
from bot.api.voters import KEY_PURPOSE, WebVoters
from bot.feedback.aio import AsyncFeedbackStore
from bot.feedback.provenance import Provenance, provenance_for
from bot.feedback.records import (
    FeedbackError,
    InvalidRecord,
    PairCounts,
    StoredAnswer,
    UnknownAnswer,
    UnknownPair,
)
from bot.serving.engine import Answer, Message
from bot.serving.settings import EngineSettings

# What the store accepts as an id; a completion id (chatcmpl-<hex>) is one.
Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class AnswerVoteBody(BaseModel):
    """👍/👎 on one answer.

    Who votes is not in the body (a ``voter`` field from older clients is
    ignored like any unknown field): see :mod:`bot.api.voters`.
    """

    answer_id: Id
    rating: Literal["up", "down"]


class PairVoteBody(BaseModel):
    """Which of two answers to the same question is better: side ``a`` (shown first) or ``b``.

    The answers may be of any two models (``base`` vs ``v2``, ``v1`` vs ``v2``).
    """

    a_answer_id: Id
    b_answer_id: Id
    choice: Literal["a", "b", "tie", "both_bad"]


class BaseFinetunedVoteBody(BaseModel):
    """The pair vote as pages before several adapters sent it: base first, by model name."""

    base_answer_id: Id
    finetuned_answer_id: Id
    choice: Literal["base", "finetuned", "both_bad"]

    def sides(self) -> PairVoteBody:
        side = {"base": "a", "finetuned": "b"}.get(self.choice, self.choice)
        return PairVoteBody.model_validate(
            {
                "a_answer_id": self.base_answer_id,
                "b_answer_id": self.finetuned_answer_id,
                "choice": side,
            }
        )


@dataclass(frozen=True)
class ApiFeedback:
    """The store, and what the API stamps on each answer it records: model, adapter, settings."""

    store: AsyncFeedbackStore
    provenance: Provenance

    @classmethod
    async def open(cls, path: str | os.PathLike[str], engine: EngineSettings) -> ApiFeedback:
        """Open the store and hash the adapter's weights, both off the event loop."""
        store = await AsyncFeedbackStore.open(path)
        return cls(store, await asyncio.to_thread(provenance_for, engine))

    def record(
        self,
        completion_id: str,
        messages: Sequence[Message],
        answer: Answer,
        max_tokens: int | None,
    ) -> None:
        """Queue an answer for the store; one stopped by a shutdown is not worth a vote."""
        if answer.finish_reason == "cancelled":
            return
        record = self.provenance.of_answer(messages, answer, "api", answer_id=completion_id)
        cap = record.settings.get("max_new_tokens")
        if max_tokens is not None and (cap is None or max_tokens < cap):
            record = dataclasses.replace(
                record, settings={**record.settings, "max_new_tokens": max_tokens}
            )
        self.store.record_answer_soon(record)


class FeedbackRoute:
    """``POST /v1/feedback``; a 404 that says why when the server keeps no feedback."""

    def __init__(self, feedback: ApiFeedback | None, settings: ApiSettings | None = None) -> None:
        self._feedback = feedback
        settings = settings or ApiSettings()
        self._voters = (
            WebVoters(
                feedback.store.store.derived_key(KEY_PURPOSE),
                token=settings.token,
                votes_per_minute=settings.votes_per_minute,
            )
            if feedback is not None
            else None
        )

    def install(self, app: web.Application) -> None:
        """Take votes on ``POST /v1/feedback``, and give each browser its voter id with the page."""
        app.router.add_post("/v1/feedback", self.post)
        if self._voters is not None:
            self._voters.install(app)

    async def post(self, request: web.Request) -> web.Response:
        if self._feedback is None or self._voters is None:
            raise ApiError(
                404,
                "This server keeps no feedback (FEEDBACK_DB is off): set FEEDBACK_DB to a file.",
                code="feedback_disabled",
            )
        vote = _parse_vote(await _json_body(request))
        voter = self._voters.voter_of(request)
        self._voters.check_rate(request, voter)
        store = self._feedback.store
        try:
            if isinstance(vote, AnswerVoteBody):
                result = await store.vote_answer(vote.answer_id, voter, vote.rating)
                return web.json_response(
                    {
                        "answer_id": vote.answer_id,
                        "rating": vote.rating,
                        "previous": result.previous,
                        "counts": {"up": result.counts.up, "down": result.counts.down},
                    }
                )
            said = vote.choice
            legacy = isinstance(vote, BaseFinetunedVoteBody)
            if isinstance(vote, BaseFinetunedVoteBody):
                vote = vote.sides()
            a = await store.get_answer(vote.a_answer_id)
            b = await store.get_answer(vote.b_answer_id)
            if _question(a) != _question(b):
                raise InvalidRecord("the two answers are not answers to the same question")
            pair_id = await store.pair_recorded(a.answer_id, b.answer_id)
            pair = await store.vote_pair(pair_id, voter, vote.choice)
        except (UnknownAnswer, UnknownPair) as error:
            raise ApiError(
                404, f"{error}: vote on an answer this server gave.", code="not_found"
            ) from None
        except FeedbackError as error:
            raise ApiError(400, str(error)) from None
        return web.json_response(
            {
                "pair_id": pair_id,
                "choice": said,
                "previous": _as_said(pair.previous, legacy=legacy),
                "models": {"a": a.variant, "b": b.variant},
                "counts": _counts(pair.counts, legacy=legacy),
            }
        )


def _counts(counts: PairCounts, *, legacy: bool) -> dict[str, int]:
    """The pair's votes, keyed as the vote named sides: by letter, or (legacy) base/finetuned."""
    if legacy:
        return {"base": counts.base, "finetuned": counts.finetuned, "both_bad": counts.both_bad}
    return {"a": counts.a, "b": counts.b, "tie": counts.tie, "both_bad": counts.both_bad}


def _as_said(previous: str | None, *, legacy: bool) -> str | None:
    """The voter's previous choice in the words of this vote: a side letter, or base/finetuned."""
    if previous is None:
        return None
    if legacy:
        return {"a": "base", "b": "finetuned"}.get(previous, previous)
    return {"base": "a", "finetuned": "b"}.get(previous, previous)


def _question(answer: StoredAnswer) -> str:
    return answer.conversation[-1]["content"]


async def _json_body(request: web.Request) -> Any:
    return decode_json_body(await request.read())


def _parse_vote(body: Any) -> AnswerVoteBody | PairVoteBody | BaseFinetunedVoteBody:
    """One of the vote shapes; the first problem names its field."""
    if not isinstance(body, dict) or not ({"rating", "choice"} & body.keys()):
        raise ApiError(
            400,
            "Send {'answer_id', 'rating': 'up'|'down'} or "
            "{'a_answer_id', 'b_answer_id', 'choice': 'a'|'b'|'tie'|'both_bad'}.",
        )
    shape: type[AnswerVoteBody | PairVoteBody | BaseFinetunedVoteBody]
    if "rating" in body:
        shape = AnswerVoteBody
    elif "base_answer_id" in body or "finetuned_answer_id" in body:
        shape = BaseFinetunedVoteBody
    else:
        shape = PairVoteBody
    try:
        return shape.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"'{param}': {first['msg']}.", param=param) from None
