"""The bot connected to a loopback Discord, answering with a given engine: one helper for every bot test.

Connecting costs discord.py's two-second wait for guilds, so end-to-end
modules share one :class:`World` (a module-scoped fixture around
:func:`discord_world`); a test that needs the bot restarted or reconfigured
calls :meth:`World.stop_bot` and :meth:`World.start_bot`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pytest

from bot.discord_bot.client import FreeskiBot
from bot.discord_bot.settings import BotSettings
from bot.serving.engine import Engine
from bot.serving.settings import EngineSettings
from tests.fake_discord import GUILD_ID, FakeDiscord

FAKE_TOKEN = "fake-token-" + "x" * 40  # the shape BotSettings accepts
E = TypeVar("E", bound=Engine)


def bot_settings(**overrides: Any) -> BotSettings:
    """Settings for a bot on the fake Discord's guild; ``overrides`` as in :class:`BotSettings`."""
    fields: dict[str, Any] = {
        "discord_token": FAKE_TOKEN,
        "engine": EngineSettings(),
        "guild_id": GUILD_ID,
    }
    return BotSettings(**{**fields, **overrides})


@dataclass
class World(Generic[E]):
    """A fake Discord, the engine the bot answers with, and the bot while it runs."""

    fake: FakeDiscord
    engine: E
    settings: BotSettings
    shutdown_grace_s: float = 5.0
    bot: FreeskiBot | None = None
    connection: asyncio.Task[None] | None = None

    async def start_bot(self) -> FreeskiBot:
        """Connect a new bot with :attr:`settings` (a restart, if one ran before)."""
        self.bot = FreeskiBot(
            self.settings,
            self.engine,
            edit_interval_s=0.05,
            shutdown_grace_s=self.shutdown_grace_s,
        )
        self.connection = asyncio.create_task(self.bot.start(self.settings.discord_token))
        await asyncio.wait_for(self.bot.wait_until_ready(), 15)
        return self.bot

    async def stop_bot(self) -> None:
        """Close the bot as SIGTERM would (running answers get the grace period)."""
        assert self.bot is not None and self.connection is not None
        await asyncio.wait_for(self.bot.close(), 15)
        await asyncio.wait({self.connection}, timeout=10)


@contextlib.asynccontextmanager
async def discord_world(
    engine: E, settings: BotSettings | None = None, *, shutdown_grace_s: float = 5.0
) -> AsyncIterator[World[E]]:
    """Start ``engine``, a fake Discord and the bot on it; at the end close all three.

    The bot is closed first (unless the test did), so its last answers and
    vote records are written while the engine and Discord are still there.
    """
    fake = FakeDiscord()
    await fake.start()
    await engine.start()
    world = World(fake, engine, settings or bot_settings(), shutdown_grace_s)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            fake.patch_discord(monkeypatch)
            await world.start_bot()
            try:
                yield world
            finally:
                if world.bot is not None and not world.bot.is_closed():
                    await world.stop_bot()
    finally:
        await engine.close()
        await fake.close()
