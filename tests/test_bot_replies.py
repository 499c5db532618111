"""Streaming an answer into a reply target: previews while text arrives, none after the end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import discord
import pytest

from bot.discord_bot.replies import STREAMING_MARK, LiveText, ThrottledEdits

pytestmark = pytest.mark.timeout(10)


class RecordingTarget:
    def __init__(self) -> None:
        self.shown: list[str] = []
        self.finished: list[list[str]] = []

    async def show(self, content: str) -> None:
        self.shown.append(content)

    async def finish(self, parts: list[str]) -> list[object]:
        self.finished.append(parts)
        return []


async def test_text_is_previewed_then_replaced_by_the_final_answer() -> None:
    target = RecordingTarget()
    live = LiveText(target, interval_s=0.01)
    live.feed("Wax ")
    live.feed("it.")
    await asyncio.sleep(0.05)
    await live.finish(live.text)
    assert target.shown == ["Wax it." + STREAMING_MARK]
    assert target.finished == [["Wax it."]]


async def test_text_arriving_after_the_end_shows_no_preview() -> None:
    """The local engine hands text over with call_soon_threadsafe: a delta queued before a
    cancellation reached the worker can arrive after the answer was finished or removed."""
    target = RecordingTarget()
    live = LiveText(target, interval_s=0.01)
    live.feed("Wax")
    await asyncio.sleep(0.05)
    await live.finish(live.text, note="_(stopped)_")
    live.feed(" late")
    await asyncio.sleep(0.05)
    assert target.shown == ["Wax" + STREAMING_MARK], "a late preview overwrote the final answer"
    assert target.finished == [["Wax\n\n_(stopped)_"]]
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not leftovers, f"a preview task outlived the answer: {leftovers}"


async def test_changes_during_an_edit_are_shown_together_and_a_failed_edit_is_skipped() -> None:
    state = {"text": "a"}
    shown: list[str] = []
    release = asyncio.Event()
    second_shown = asyncio.Event()

    async def show() -> None:
        shown.append(state["text"])
        if len(shown) == 1:
            await release.wait()
            raise discord.HTTPException(SimpleNamespace(status=429, reason="rate limited"), "")
        second_shown.set()

    edits = ThrottledEdits(show, interval_s=0.01)
    edits.changed()
    await asyncio.sleep(0)  # the first edit starts and waits
    for text in ("ab", "abc"):
        state["text"] = text
        edits.changed()
    release.set()
    await asyncio.wait_for(second_shown.wait(), timeout=5)
    await edits.stop()
    edits.changed()
    assert shown == ["a", "abc"]
