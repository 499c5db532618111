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
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import discord

from bot.feedback import metrics
from bot.feedback.aio import AsyncFeedbackStore
from bot.feedback.ids import new_answer_id, new_pair_id
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
)
from bot.serving.engine import Answer, Message
from bot.serving.settings import EngineSettings
from finetune.errors import UserError

log = logging.getLogger(__name__)

ACK_BUDGET_S = 2.0  # answer in place until then; later, defer and follow up (Discord allows 3 s)
ID = r"[A-Za-z0-9_-]{1,64}"
RATE_TEMPLATE = rf"fb:a:(?P<id>{ID}):(?P<rating>up|down)"
PREFERENCE_TEMPLATE = rf"fb:p:(?P<id>{ID}):(?P<choice>base|finetuned|both_bad)"

RATING_EMOJI: dict[str, str] = {"up": "👍", "down": "👎"}
CHOICE_LABELS: dict[str, str] = {
    "base": "Base is better",
    "finetuned": "Finetuned is better",
    "both_bad": "Both bad",
}
GONE = "Sorry, I no longer have that answer on record, so this vote can't be counted."
OFF = "Voting is switched off on this bot right now."
FAILED = "Sorry, your vote could not be saved. The error was logged."

T = TypeVar("T")


class RateButton(discord.ui.DynamicItem[discord.ui.Button], template=RATE_TEMPLATE):
    """👍 or 👎 on one answer."""

    def __init__(self, answer_id: str, rating: Rating) -> None:
        super().__init__(
            discord.ui.Button(
                emoji=RATING_EMOJI[rating],
                style=discord.ButtonStyle.secondary,
                custom_id=f"fb:a:{answer_id}:{rating}",
            )
        )
        self.answer_id = answer_id
        self.rating: Rating = rating

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: Any, /
    ) -> RateButton:
        return cls(match["id"], match["rating"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await _acknowledge(
            interaction,
            lambda feedback: feedback.vote_answer(self.answer_id, _voter(interaction), self.rating),
        )


class PreferenceButton(discord.ui.DynamicItem[discord.ui.Button], template=PREFERENCE_TEMPLATE):
    """One of "Base is better" / "Finetuned is better" / "Both bad" on a ``/compare``."""

    def __init__(self, pair_id: str, choice: Choice) -> None:
        super().__init__(
            discord.ui.Button(
                label=CHOICE_LABELS[choice],
                style=discord.ButtonStyle.secondary,
                custom_id=f"fb:p:{pair_id}:{choice}",
            )
        )
        self.pair_id = pair_id
        self.choice: Choice = choice

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: Any, /
    ) -> PreferenceButton:
        return cls(match["id"], match["choice"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await _acknowledge(
            interaction,
            lambda feedback: feedback.vote_pair(self.pair_id, _voter(interaction), self.choice),
        )


DYNAMIC_ITEMS = (RateButton, PreferenceButton)


def answer_view(answer_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for rating in ("up", "down"):
        view.add_item(RateButton(answer_id, rating))  # type: ignore[arg-type]
    return view


def pair_view(pair_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for choice in CHOICE_LABELS:
        view.add_item(PreferenceButton(pair_id, choice))  # type: ignore[arg-type]
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
        await self.store.close()

    def answer_view_for(self, messages: Sequence[Message], answer: Answer) -> discord.ui.View:
        """Queue the record of ``answer`` to ``messages`` and return its 👍/👎 buttons."""
        answer_id = new_answer_id()
        self.store.record_answer_soon(
            self.provenance.record(
                messages,
                answer.text,
                answer.variant,
                "discord",
                answer_id=answer_id,
                sources=answer.sources,
            )
        )
        return answer_view(answer_id)

    def pair_view_for(
        self, messages: Sequence[Message], base: Answer, finetuned: Answer
    ) -> discord.ui.View:
        """Queue the record of a ``/compare``'s two answers and return its preference buttons."""
        pair_id = new_pair_id()
        self.store.record_pair_soon(
            self.provenance.record(messages, base.text, "base", "discord", sources=base.sources),
            self.provenance.record(
                messages, finetuned.text, "finetuned", "discord", sources=finetuned.sources
            ),
            pair_id,
        )
        return pair_view(pair_id)

    async def vote_answer(self, answer_id: str, voter: str, rating: Rating) -> str:
        outcome: AnswerVote = await self.store.vote_answer(answer_id, voter, rating)
        await self._republish()
        counts = outcome.counts
        verb = _verb(outcome.previous, rating)
        return (
            f"{verb} {RATING_EMOJI[rating]}: this answer has {counts.up} 👍 and {counts.down} 👎."
        )

    async def vote_pair(self, pair_id: str, voter: str, choice: Choice) -> str:
        outcome: PairVote = await self.store.vote_pair(pair_id, voter, choice)
        await self._republish()
        c = outcome.counts
        verb = _verb(outcome.previous, choice)
        return (
            f"{verb} “{CHOICE_LABELS[choice]}”. Votes so far: base {c.base}, "
            f"finetuned {c.finetuned}, both bad {c.both_bad}."
        )

    async def summary(self) -> FeedbackSummary:
        """Votes on the adapter this bot serves now."""
        return await self.store.summary(self.provenance.adapter)

    async def status_rows(self) -> dict[str, str]:
        """The ``/status`` lines: votes and the finetuned-vs-base win rate of the current adapter."""
        s = await self.summary()
        rate = (
            f"{s.win_rate:.0%} of {s.decided} votes" if s.win_rate is not None else "no votes yet"
        )
        return {
            "Votes (this adapter)": f"{s.up} 👍 / {s.down} 👎 on {s.answers} answers",
            "Finetuned vs base": f"{rate} ({s.both_bad} both bad, {s.pairs_voted} comparisons)",
        }

    async def _republish(self) -> None:
        try:
            metrics.publish(await self.summary())
        except FeedbackError:
            log.warning("could not refresh the feedback metrics", exc_info=True)


def _verb(previous: str | None, new: str) -> str:
    if previous is None:
        return "Thanks, counted"
    if previous == new:
        return "Already counted"
    return "Changed your vote to"


def _voter(interaction: discord.Interaction) -> str:
    return f"discord:{interaction.user.id}"


async def _acknowledge(
    interaction: discord.Interaction,
    vote: Callable[[DiscordFeedback], Awaitable[str]],
) -> None:
    """Count the click and tell the clicker, privately, within Discord's deadline."""
    feedback: DiscordFeedback | None = getattr(interaction.client, "feedback", None)
    if feedback is None:
        await _tell(interaction, OFF)
        return
    task = asyncio.ensure_future(vote(feedback))
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


async def _tell(interaction: discord.Interaction, text: str) -> None:
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        log.warning("could not acknowledge a vote: %s", exc)
