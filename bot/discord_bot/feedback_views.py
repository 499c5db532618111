"""Vote buttons under the bot's answers: 👍/👎 on one answer, "which is better" on a ``/compare``.

The buttons are :class:`discord.ui.DynamicItem` s whose ``custom_id`` carries
the answer (or pair) id and the vote, registered once in ``setup_hook``: any
click on any message the bot ever wrote is routed by its ``custom_id`` alone,
so buttons keep working after a restart without keeping views in memory.

Every click is acknowledged within Discord's 3 s: the vote is written on the
store's thread, and if that is slow the click is deferred first and answered
by a followup. The voter is passed to the store as ``discord:<user id>``,
which keeps only a salted hash of it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Awaitable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import discord

from bot.feedback import metrics
from bot.feedback.aio import AsyncFeedbackStore
from bot.feedback.ids import new_answer_id, new_pair_id
from bot.feedback.leaderboard import HeadToHead
from bot.feedback.provenance import Provenance, provenance_for
from bot.feedback.records import (
    AnswerVote,
    Choice,
    FeedbackError,
    FeedbackSummary,
    PairVote,
    Rating,
    UnknownAnswer,
    UnknownPair,
    VoteChoice,
)
from bot.serving.adapters import BASE, ServedModels
from bot.serving.engine import Answer, Message
from bot.serving.settings import EngineSettings
from freeski_common.errors import UserError

log = logging.getLogger(__name__)

ACK_BUDGET_S = 2.0  # answer in place until then; later, defer and follow up (Discord allows 3 s)
ID = r"[A-Za-z0-9_-]{1,64}"
# fb:a:<answer id>:up|down (👍/👎 on one answer), fb:p:<pair id>:<choice> (a /compare's pair:
# side a or b, a tie or both bad; base|finetuned are the buttons of pairs shown before sides)
VOTE_TEMPLATE = (
    rf"fb:(?:a:(?P<answer>{ID}):(?P<rating>up|down)"
    rf"|p:(?P<pair>{ID}):(?P<choice>a|b|tie|both_bad|base|finetuned))"
)

RATING_EMOJI: dict[str, str] = {"up": "👍", "down": "👎"}
# The buttons under a /compare, in order.
PAIR_CHOICES: tuple[Choice, ...] = ("a", "b", "tie", "both_bad")
CHOICE_LABELS: dict[str, str] = {
    "a": "A is better",
    "b": "B is better",
    "tie": "Tie",
    "both_bad": "Both bad",
    "base": "Base is better",
    "finetuned": "Finetuned is better",
}
GONE = "Sorry, I no longer have that answer on record, so this vote can't be counted."
OFF = "Voting is switched off on this bot right now."
FAILED = "Sorry, your vote could not be saved. The error was logged."


class VoteButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=VOTE_TEMPLATE
):
    """👍/👎 on one answer, or one of "Base is better" / "Finetuned is better" / "Both bad".

    The class counts nothing itself: each :class:`DiscordFeedback` makes the
    subclass bound to its store (:attr:`DiscordFeedback.button`), and that is
    what the client registers, so a click reaches its store without the
    button asking the client for it.
    """

    feedback: ClassVar[DiscordFeedback | None] = None

    def __init__(self, custom_id: str) -> None:
        match = re.fullmatch(VOTE_TEMPLATE, custom_id)
        assert match is not None, custom_id
        self.vote = match
        rating, choice = match["rating"], match["choice"]
        super().__init__(
            discord.ui.Button(
                style=discord.ButtonStyle.secondary,
                custom_id=custom_id,
                emoji=RATING_EMOJI[rating] if rating else None,
                label=CHOICE_LABELS[choice] if choice else None,
            )
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, _item: discord.ui.Item[Any], match: Any, /
    ) -> VoteButton:
        return cls(match[0])

    def _count(self, feedback: DiscordFeedback, voter: str) -> Awaitable[str]:
        vote = self.vote
        # cast: VOTE_TEMPLATE admits only the values of Rating and VoteChoice.
        if vote["answer"]:
            return feedback.vote_answer(vote["answer"], voter, cast(Rating, vote["rating"]))
        return feedback.vote_pair(vote["pair"], voter, cast(VoteChoice, vote["choice"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        """Count the click and tell the clicker, privately, within Discord's deadline."""
        feedback = self.feedback
        if feedback is None or feedback.closed:
            await _tell(interaction, OFF)
            return
        task = asyncio.ensure_future(self._count(feedback, f"discord:{interaction.user.id}"))
        done, _ = await asyncio.wait({task}, timeout=ACK_BUDGET_S)
        if not done:  # the store is slow (a long write elsewhere): ack now, answer when it lands
            await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            text = await task
        except (UnknownAnswer, UnknownPair):
            text = GONE
        except Exception:
            log.exception("vote from %s not saved", interaction.user.id)
            text = FAILED
        await _tell(interaction, text)


def _buttons(button: type[VoteButton], custom_ids: Iterable[str]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for custom_id in custom_ids:
        view.add_item(button(custom_id))
    return view


class DiscordFeedback:
    """The bot's side of the feedback store: records what it showed, counts clicks, reports.

    Records are queued on the store's thread (``*_soon``) before the answer is
    shown, so the event loop never waits on SQLite and a click always finds
    its answer already written.
    """

    def __init__(self, store: AsyncFeedbackStore, provenance: Provenance) -> None:
        self.store = store
        self.provenance = provenance
        self.closed = False
        owner = self

        class BoundVoteButton(VoteButton, template=VOTE_TEMPLATE):
            feedback = owner

        # The button class whose clicks count here: the client registers it in setup_hook.
        self.button: type[VoteButton] = BoundVoteButton

    @classmethod
    async def open(cls, path: Path, engine: EngineSettings) -> DiscordFeedback:
        try:
            store = await AsyncFeedbackStore.open(path)
        except (OSError, sqlite3.Error, ValueError) as exc:
            raise UserError(
                f"FEEDBACK_DB={path}: cannot open it ({exc}); point it at a writable file, "
                "or set FEEDBACK_DB=off"
            ) from None
        feedback = cls(store, await asyncio.to_thread(provenance_for, engine))
        metrics.publish(await feedback.summary())
        log.info(
            "recording votes in %s (adapter %s)", path, feedback.provenance.adapter.hash or "none"
        )
        return feedback

    async def close(self) -> None:
        self.closed = True  # a late click is told voting is off, not that its vote failed
        await self.store.close()

    def answer_view_for(self, messages: Sequence[Message], answer: Answer) -> discord.ui.View:
        """Queue the record of ``answer`` to ``messages`` and return its 👍/👎 buttons.

        The answer is recorded under the adapter that wrote it and its weights' hash.
        """
        answer_id = new_answer_id()
        self.store.record_answer_soon(
            self.provenance.of_answer(messages, answer, "discord", answer_id=answer_id)
        )
        return _buttons(self.button, (f"fb:a:{answer_id}:{rating}" for rating in RATING_EMOJI))

    def pair_view_for(self, messages: Sequence[Message], a: Answer, b: Answer) -> discord.ui.View:
        """Queue the record of a ``/compare``'s two answers, ``a`` shown first, and return
        its buttons: A is better, B is better, tie, both bad."""
        pair_id = new_pair_id()
        self.store.record_pair_soon(
            self.provenance.of_answer(messages, a, "discord"),
            self.provenance.of_answer(messages, b, "discord"),
            pair_id,
        )
        return _buttons(self.button, (f"fb:p:{pair_id}:{choice}" for choice in PAIR_CHOICES))

    async def vote_answer(self, answer_id: str, voter: str, rating: Rating) -> str:
        outcome: AnswerVote = await self.store.vote_answer(answer_id, voter, rating)
        await self._republish()
        counts = outcome.counts
        verb = _verb(outcome.previous, rating)
        return (
            f"{verb} {RATING_EMOJI[rating]}: this answer has {counts.up} 👍 and {counts.down} 👎."
        )

    async def vote_pair(self, pair_id: str, voter: str, choice: VoteChoice) -> str:
        """Count the vote and tell the voter which model wrote which side (the blind reveal)."""
        outcome: PairVote = await self.store.vote_pair(pair_id, voter, choice)
        pair = await self.store.get_pair(pair_id)
        await self._republish()
        c = outcome.counts
        verb = _verb(outcome.previous, choice)
        a, b = pair.a.variant, pair.b.variant
        return (
            f"{verb} “{CHOICE_LABELS[choice]}”. A was **{a}**, B was **{b}**. Votes so far: "
            f"A ({a}) {c.a}, B ({b}) {c.b}, tie {c.tie}, both bad {c.both_bad}."
        )

    async def summary(self) -> FeedbackSummary:
        """Votes on the adapter this bot serves now."""
        return await self.store.summary(self.provenance.adapter)

    async def status_rows(self, served: ServedModels) -> dict[str, str]:
        """The ``/status`` lines: each served adapter's votes and its results against base.

        Read from the leaderboard, so they count as ``python -m bot feedback
        leaderboard`` does; only the weights served now are shown (an adapter's
        earlier weights under the same name are other entries there).
        """
        board = await self.store.leaderboard()
        now = {a.name: a.weights_hash for a in served.adapters}
        votes = [
            f"{s.model.label}: {s.up} 👍 / {s.down} 👎 on {s.answers} answers"
            for s in board.standings
            if s.model.name == BASE or now.get(s.model.name, "") in (None, s.model.weights)
        ]
        results = [f"{h.model.label}: {_rate(h)}" for h in board.against_base_of(now).values()]
        return {
            "Votes": "\n".join(votes) or "no answers recorded yet",
            "Vs base": "\n".join(results) or "no comparisons with base yet",
        }

    async def _republish(self) -> None:
        try:
            metrics.publish(await self.summary())
        except FeedbackError:
            log.warning("could not refresh the feedback metrics", exc_info=True)


def _rate(h: HeadToHead) -> str:
    """``62% of 13 votes (95% 40–80%), 2 both bad``: the win rate, ties counted half."""
    if h.win_rate is None or h.interval is None:
        return f"no decided votes yet ({h.both_bad} both bad)"
    low, high = h.interval.low, h.interval.high
    return (
        f"{h.win_rate:.0%} of {h.decided} votes (95% {low:.0%}–{high:.0%}), "
        f"{h.ties} ties, {h.both_bad} both bad"
    )


def _verb(previous: str | None, new: str) -> str:
    if previous is None:
        return "Thanks, counted"
    if previous == new:
        return "Already counted"
    return "Changed your vote to"


async def _tell(interaction: discord.Interaction, text: str) -> None:
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        log.warning("could not acknowledge a vote: %s", exc)
