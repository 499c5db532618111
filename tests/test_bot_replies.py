"""Streaming an answer into a reply target: previews while text arrives, none after the end."""

from __future__ import annotations

import asyncio

import pytest

from bot.discord_bot.replies import STREAMING_MARK, LiveText

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
