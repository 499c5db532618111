"""Shutting down while answers are still waiting: every asker is told, none is left hanging.

A bot of its own (the shared one in test_bot_e2e closes only at its end), with
a short grace period and an engine too slow to write anything within it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bot.discord_bot.commands import NOTES
from tests.discord_world import discord_world
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(30)


async def test_answers_stopped_by_shutdown_before_any_text_say_so() -> None:
    engine = ScriptedEngine(step_s=30)  # no word arrives before the grace period ends
    async with discord_world(engine, shutdown_grace_s=0.2) as world:
        fake = world.fake
        asked = await fake.user_says("Which bindings for park?")
        compare = await fake.slash_command("compare", {"question": "Twin tips?"})
        # The mention, and /compare's two variants; the scripted engine has no event for it.
        while len(engine.requests) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await world.stop_bot()

    def reply_to_mention() -> dict[str, Any] | None:
        return next(
            (
                m
                for m in fake.bot_messages()
                if (m.get("message_reference") or {}).get("message_id") == asked["id"]
            ),
            None,
        )

    compare_response = next(
        m for m in fake.messages.values() if m.get("interaction_token") == compare["token"]
    )
    assert engine.cancelled == 3
    assert (reply_to_mention() or {}).get("content") == NOTES["cancelled"]
    assert compare_response["content"] == NOTES["cancelled"]
