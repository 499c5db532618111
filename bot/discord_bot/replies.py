"""Streaming an answer into Discord: one message edited as text arrives, then split to fit.

Discord rate-limits message edits (about five per five seconds per channel),
so the text is shown at most once per ``interval_s`` whatever the model's
pace; the final answer replaces the preview and overflows into further
messages at the 2,000-character limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import discord

from bot.discord_bot.messages import DISCORD_MESSAGE_LIMIT, split_message, with_sources

log = logging.getLogger(__name__)

STREAMING_MARK = " …"

# discord.py's "no view given": unlike None, it leaves a message's components as they are.
NO_VIEW: discord.ui.View = discord.utils.MISSING


def view_here(view: discord.ui.View | None, *, here: bool = True) -> discord.ui.View:
    """``view`` on the message it belongs on (``here``), else no view at all."""
    return view if view is not None and here else NO_VIEW


class ReplyTarget(Protocol):
    """Where an answer is shown: a reply to a mention, or an interaction's response."""

    async def show(self, content: str) -> None:
        """Create or edit the first message of the answer."""

    async def finish(
        self, parts: list[str], view: discord.ui.View | None = None
    ) -> list[discord.Message]:
        """Show the final answer: the first part in the first message, the rest after it.

        ``view`` (the vote buttons) goes on the last part, under the whole answer.
        """


class MessageReply:
    """Answers a mention: a reply to the question, continued by replies to each part.

    Each part replies to the previous one, so a user replying to any part of a
    long answer still reaches the whole conversation up the chain.
    """

    def __init__(self, question: discord.Message) -> None:
        self.question = question
        self.message: discord.Message | None = None

    async def show(self, content: str, view: discord.ui.View | None = None) -> None:
        if self.message is None:
            self.message = await self.question.reply(content, view=view_here(view))
        else:
            self.message = await self.message.edit(content=content, view=view_here(view))

    async def finish(
        self, parts: list[str], view: discord.ui.View | None = None
    ) -> list[discord.Message]:
        await self.show(parts[0], view if len(parts) == 1 else None)
        assert self.message is not None
        sent = [self.message]
        for number, part in enumerate(parts[1:], start=2):
            sent.append(await sent[-1].reply(part, view=view_here(view, here=number == len(parts))))
        return sent


class InteractionReply:
    """Answers a deferred slash command: edits the "thinking…" response, then follows up."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction

    async def show(self, content: str) -> None:
        await self.interaction.edit_original_response(content=content)

    async def finish(
        self, parts: list[str], view: discord.ui.View | None = None
    ) -> list[discord.Message]:
        first = view_here(view, here=len(parts) == 1)
        sent: list[discord.Message] = [
            await self.interaction.edit_original_response(content=parts[0], view=first)
        ]
        for number, part in enumerate(parts[1:], start=2):
            last = view_here(view, here=number == len(parts))
            sent.append(await self.interaction.followup.send(part, wait=True, view=last))
        return sent


class ThrottledEdits:
    """Runs ``show`` after each change, but at most once per ``interval_s``.

    The one throttle behind every streamed preview (:class:`LiveText`, the
    ``/compare`` side by side): changes made between two edits are shown by
    the next one, and a failed edit is logged and skipped, as a missed preview
    is harmless.
    """

    def __init__(self, show: Callable[[], Awaitable[None]], *, interval_s: float) -> None:
        self.show = show
        self.interval_s = interval_s
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def changed(self) -> None:
        """Ask for an edit; called on the event loop, never blocks. A no-op once stopped."""
        self._changed.set()
        if self._task is None and not self._stopped:
            self._task = asyncio.create_task(self._edit_periodically())

    async def _edit_periodically(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self.show()
            except discord.HTTPException as exc:
                log.warning("could not show streamed text: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        """Stop editing for good (before the final answer replaces the preview)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class LiveText:
    """Accumulates streamed text and shows it on a :class:`ReplyTarget`, at most once per interval."""

    def __init__(self, target: ReplyTarget, *, interval_s: float = 1.0, prefix: str = "") -> None:
        self.target = target
        self.prefix = prefix
        self.text = ""
        self._shown = ""
        self._edits = ThrottledEdits(self._show_preview, interval_s=interval_s)

    def feed(self, delta: str) -> None:
        """Add streamed text; called from the event loop, never blocks.

        Text can still arrive after :meth:`stop`: the local engine's worker
        thread may have queued a delta before it saw the cancellation. It is
        kept, but no preview starts again over the final answer.
        """
        self.text += delta
        self._edits.changed()

    async def _show_preview(self) -> None:
        preview = self.preview()
        if preview != self._shown:
            await self.target.show(preview)
            self._shown = preview

    def preview(self) -> str:
        """The text so far, marked as still being written and cut to one message."""
        room = DISCORD_MESSAGE_LIMIT - len(self.prefix) - len(STREAMING_MARK)
        return self.prefix + self.text.strip()[:room] + STREAMING_MARK

    async def stop(self) -> None:
        """Stop previewing for good (before the final answer replaces the preview)."""
        await self._edits.stop()

    async def finish(
        self,
        text: str,
        *,
        note: str = "",
        view: discord.ui.View | None = None,
        sources: str = "",
    ) -> list[discord.Message]:
        """Replace the preview by the final ``text`` (plus ``note``), split to Discord's limit.

        ``sources`` (a :func:`~bot.discord_bot.messages.sources_block`) goes in the last part.
        """
        await self.stop()
        body = (self.prefix + text.strip()).strip() or "_(the model gave an empty answer)_"
        if note:
            body = f"{body}\n\n{note}"
        parts = with_sources(split_message(body), sources)
        return await (self.target.finish(parts, view) if view else self.target.finish(parts))
