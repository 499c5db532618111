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
from bot.serving.engine import Message
from freeski_common.errors import UserError

Source = Literal["discord", "api"]
SOURCES: tuple[Source, ...] = ("discord", "api")
Rating = Literal["up", "down"]
RATINGS: tuple[Rating, ...] = ("up", "down")
# The two answers of a pair are its sides: ``a`` is the first one shown (``base`` in every
# pair recorded before several adapters were served), ``b`` the second.
Side = Literal["a", "b"]
SIDES: tuple[Side, ...] = ("a", "b")
# What a pair vote stores: a side, a tie (both as good), or both bad.
Choice = Literal["a", "b", "tie", "both_bad"]
CHOICES: tuple[Choice, ...] = ("a", "b", "tie", "both_bad")
# What a voter may also say: the name of a side, as the buttons and the web page did when
# every pair was base (side a) vs finetuned (side b). Resolved to that pair's side.
VoteChoice = Literal["a", "b", "tie", "both_bad", "base", "finetuned"]
VOTE_CHOICES: tuple[VoteChoice, ...] = (*CHOICES, "base", "finetuned")

# Answer and pair ids travel inside Discord custom_ids and URLs: no separators, 64 chars at most.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A served model's name: ``base``, ``finetuned`` (the default adapter's alias) or an
# adapter's name, as the API's ``model`` field and Discord's options spell it.
NAME_PATTERN = re.compile(r"^[a-z0-9._-]{1,32}$")


class FeedbackError(Exception):
    """Something about a vote or a record the caller can report to the user."""


class UnknownAnswer(FeedbackError, LookupError):
    """No answer with that id is stored (never recorded, or the store was reset)."""


class UnknownPair(FeedbackError, LookupError):
    """No complete pair (both answers) with that id is stored."""


class UnusableStore(FeedbackError, ValueError, UserError):
    """The file is no feedback store, or one written by a newer version of the bot.

    A :class:`UserError` too: a command line given such a file says so in one line.
    """


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

    ``variant`` is the name the answer was served under: ``base``, or the
    adapter's own name (``v2``); ``finetuned`` is what was recorded before
    several adapters were served, and stays valid. ``answer_id`` is chosen by
    the caller (a completion id on the API) or generated here, so a front end knows it before the write lands and can put
    it in a button at once. ``thread_key`` groups answers of one conversation
    for the train/test split; by default it is derived from the
    conversation's first user message.
    """

    conversation: Sequence[Message]
    text: str
    variant: str
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
        check_name(self.variant, "variant")
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


@dataclass(frozen=True, init=False)
class PairCounts:
    """The votes on one pair: for side a, for side b, ties, both bad.

    ``base`` and ``finetuned`` are the names sides a and b had in every pair
    before several adapters were served; they stay accepted (as arguments and
    attributes) so callers written then keep working.
    """

    a: int
    b: int
    both_bad: int
    tie: int

    def __init__(
        self,
        a: int = 0,
        b: int = 0,
        both_bad: int = 0,
        tie: int = 0,
        *,
        base: int | None = None,
        finetuned: int | None = None,
    ) -> None:
        object.__setattr__(self, "a", a if base is None else base)
        object.__setattr__(self, "b", b if finetuned is None else finetuned)
        object.__setattr__(self, "both_bad", both_bad)
        object.__setattr__(self, "tie", tie)

    @property
    def base(self) -> int:
        return self.a

    @property
    def finetuned(self) -> int:
        return self.b

    def of(self, choice: Choice) -> int:
        count: int = getattr(self, choice)
        return count


@dataclass(frozen=True)
class AnswerVote:
    """The result of a 👍/👎: the voter's previous rating (None if first) and the new counts."""

    previous: Rating | None
    counts: AnswerCounts


@dataclass(frozen=True)
class PairVote:
    """The result of a preference vote: the voter's previous choice and the new counts."""

    previous: VoteChoice | None  # said as the vote was: a side's name if the vote named one
    counts: PairCounts


@dataclass(frozen=True)
class StoredAnswer:
    """An answer as read back, with its current 👍/👎 counts."""

    answer_id: str
    created_at: float
    source: Source
    conversation: list[Message]
    text: str
    variant: str
    model: str
    adapter: AdapterRef
    settings: dict[str, Any]
    pair_id: str | None
    thread_key: str
    counts: AnswerCounts
    sources: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class StoredPair:
    """A pair (side a's answer, side b's) and its preference votes."""

    pair_id: str
    a: StoredAnswer
    b: StoredAnswer
    counts: PairCounts

    @property
    def base(self) -> StoredAnswer:
        """Side a: the base answer in every pair recorded as base vs finetuned."""
        return self.a

    @property
    def finetuned(self) -> StoredAnswer:
        """Side b: the finetuned answer in every pair recorded as base vs finetuned."""
        return self.b


@dataclass(frozen=True)
class FeedbackSummary:
    """What ``/status`` and the metrics show for one adapter (or for all answers).

    The pair counts are over pairs of the adapter against ``base``: ``base``
    votes went to the base answer, ``finetuned`` to the adapter's. ``win_rate``
    is the adapter's share with a tie counted as half a win; "both bad" votes
    count in neither, and ``decided`` (wins, losses and ties) is the
    denominator, None rate when 0. The leaderboard counts the same way.
    """

    answers: int
    up: int
    down: int
    pairs_voted: int
    base: int
    finetuned: int
    both_bad: int
    tie: int = 0

    @property
    def decided(self) -> int:
        return self.base + self.finetuned + self.tie

    @property
    def win_rate(self) -> float | None:
        return (self.finetuned + self.tie / 2) / self.decided if self.decided else None


@dataclass(frozen=True)
class ModelRef:
    """One entry of the leaderboard: a served name and the weights behind it.

    ``weights`` is the adapter's weights hash (None for ``base``, and for an
    adapter whose weights could not be read): a name re-pointed at retrained
    weights is another model, and its votes are kept apart.
    """

    name: str
    weights: str | None = None

    @property
    def label(self) -> str:
        """``v2@1a2b3c4d``: the name, and a short hash when there are weights."""
        return f"{self.name}@{self.weights[:8]}" if self.weights else self.name


@dataclass(frozen=True)
class ModelVotes:
    """One model's answers and the 👍/👎 votes on them, as the store counts them."""

    model: ModelRef
    answers: int
    up: int
    down: int


@dataclass(frozen=True)
class PairTally:
    """Every pair vote between two models, seen from ``a``: its wins, losses, ties, both bad."""

    a: ModelRef
    b: ModelRef
    a_wins: int = 0
    b_wins: int = 0
    ties: int = 0
    both_bad: int = 0


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


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise InvalidRecord(
            f"{what} {value!r} is not a model name: 1-32 lowercase letters, digits, '.', '_' or '-'"
        )
    return value


def check_id(value: str, name: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise InvalidRecord(f"{name} {value!r} must be 1-64 letters, digits, '-' or '_'")
    return value
