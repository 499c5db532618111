"""What the feedback store holds and answers: plain values, no SQL.

Kept apart from the store so front ends and the exporter can build and read
these without importing sqlite or knowing the schema.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.feedback.ids import adapter_weights_hash, new_answer_id
from bot.serving.engine import VARIANTS, Message, Variant

Source = Literal["discord", "api"]
SOURCES: tuple[Source, ...] = ("discord", "api")
Rating = Literal["up", "down"]
RATINGS: tuple[Rating, ...] = ("up", "down")
Choice = Literal["base", "finetuned", "both_bad"]
CHOICES: tuple[Choice, ...] = ("base", "finetuned", "both_bad")

# Answer and pair ids travel inside Discord custom_ids and URLs: no separators, 64 chars at most.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class FeedbackError(Exception):
    """Something about a vote or a record the caller can report to the user."""


class UnknownAnswer(FeedbackError, LookupError):
    """No answer with that id is stored (never recorded, or the store was reset)."""


class UnknownPair(FeedbackError, LookupError):
    """No complete base/finetuned pair with that id is stored."""


class InvalidRecord(FeedbackError, ValueError):
    """A record, vote or id that the store refuses; the message says which field."""


@dataclass(frozen=True)
class AdapterRef:
    """Which adapter answered: where it was loaded from and a hash of its weights.

    The hash, not the path, decides which votes belong together: a retrained
    adapter written to the same path gets a new hash, so its votes are not
    mixed with the old one's. ``hash`` is None when the weights cannot be read
    (an adapter served by a remote OpenAI-compatible server).
    """

    path: str | None = None
    hash: str | None = None

    @classmethod
    def from_path(cls, path: str | os.PathLike[str] | None) -> AdapterRef:
        """The adapter at ``path`` with its weights hashed; an empty ref for no adapter."""
        if path is None:
            return cls()
        return cls(path=str(path), hash=adapter_weights_hash(path))


@dataclass(frozen=True)
class AnswerRecord:
    """One answer as it was shown, with everything needed to learn from a vote on it.

    ``answer_id`` is chosen by the caller (a completion id on the API) or
    generated here, so a front end knows it before the write lands and can put
    it in a button at once. ``thread_key`` groups answers of one conversation
    for the train/test split; by default it is derived from the
    conversation's first user message.
    """

    conversation: Sequence[Message]
    text: str
    variant: Variant
    model: str
    source: Source
    adapter: AdapterRef = field(default_factory=AdapterRef)
    settings: Mapping[str, Any] = field(default_factory=dict)
    answer_id: str = field(default_factory=new_answer_id)
    pair_id: str | None = None
    thread_key: str | None = None
    # The forum sources shown under the answer (see :func:`source_refs`), so a vote says
    # which passages it judged along with the text.
    sources: Sequence[Mapping[str, Any]] = ()

    def validate(self) -> None:
        check_id(self.answer_id, "answer_id")
        if self.pair_id is not None:
            check_id(self.pair_id, "pair_id")
        if self.variant not in VARIANTS:
            raise InvalidRecord(f"variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.source not in SOURCES:
            raise InvalidRecord(f"source {self.source!r} is not one of {', '.join(SOURCES)}")
        if not self.conversation or self.conversation[-1].get("role") != "user":
            raise InvalidRecord("conversation must be non-empty and end with the user's turn")
        for message in self.conversation:
            if message.get("role") not in ("system", "user", "assistant") or not isinstance(
                message.get("content"), str
            ):
                raise InvalidRecord(f"conversation holds a malformed message: {message!r}")


@dataclass(frozen=True)
class AnswerCounts:
    up: int = 0
    down: int = 0


@dataclass(frozen=True)
class PairCounts:
    base: int = 0
    finetuned: int = 0
    both_bad: int = 0


@dataclass(frozen=True)
class AnswerVote:
    """The result of a 👍/👎: the voter's previous rating (None if first) and the new counts."""

    previous: Rating | None
    counts: AnswerCounts


@dataclass(frozen=True)
class PairVote:
    """The result of a preference vote: the voter's previous choice and the new counts."""

    previous: Choice | None
    counts: PairCounts


@dataclass(frozen=True)
class StoredAnswer:
    """An answer as read back, with its current 👍/👎 counts."""

    answer_id: str
    created_at: float
    source: Source
    conversation: list[Message]
    text: str
    variant: Variant
    model: str
    adapter: AdapterRef
    settings: dict[str, Any]
    pair_id: str | None
    thread_key: str
    counts: AnswerCounts
    sources: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class StoredPair:
    """A base/finetuned pair and its preference votes."""

    pair_id: str
    base: StoredAnswer
    finetuned: StoredAnswer
    counts: PairCounts


@dataclass(frozen=True)
class FeedbackSummary:
    """What ``/status`` and the metrics show for one adapter (or for all answers).

    ``win_rate`` is finetuned votes over base + finetuned votes ("both bad"
    votes count in neither); ``decided`` is that denominator, None rate when 0.
    """

    answers: int
    up: int
    down: int
    pairs_voted: int
    base: int
    finetuned: int
    both_bad: int

    @property
    def decided(self) -> int:
        return self.base + self.finetuned

    @property
    def win_rate(self) -> float | None:
        return self.finetuned / self.decided if self.decided else None


def source_refs(passages: Sequence[Any]) -> list[dict[str, Any]]:
    """Each shown :class:`crawl.search.Passage`, as a vote is recorded with it.

    With its author and text, so the exact grounded prompt the model read can be
    rebuilt (``crawl.layout.render_question``) when votes become training data.
    """
    return [
        {
            "thread_id": p.thread_id,
            "post_id": p.post_id,
            "title": p.title,
            "url": p.url,
            "excerpt": p.excerpt,
            "score": p.score,
            "author": p.author,
            "text": p.text,
        }
        for p in passages
    ]


def check_id(value: str, name: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise InvalidRecord(f"{name} {value!r} must be 1-64 letters, digits, '-' or '_'")
    return value
