"""The Discord client: intents, safety defaults, command registration and graceful shutdown."""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_bot.admin import AdapterAdmin
from bot.discord_bot.commands import AnswerCog
from bot.discord_bot.feedback_views import DiscordFeedback
from bot.discord_bot.settings import BotSettings
from bot.serving.engine import Engine

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 20.0


class FreeskiBot(commands.Bot):
    """A ``commands.Bot`` whose only text interface is being mentioned; the rest are slash commands.

    Everything it sends carries ``AllowedMentions.none()``: answers are model
    output, and model output must never ping @everyone, a role or a user.
    """

    def __init__(
        self,
        settings: BotSettings,
        engine: Engine,
        *,
        edit_interval_s: float = 1.0,
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
    ) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
        )
        self.settings = settings
        self.engine = engine
        self.edit_interval_s = edit_interval_s
        self.shutdown_grace_s = shutdown_grace_s
        self.tree.error(self._on_app_command_error)
        self._answers: AnswerCog | None = None
        self.feedback: DiscordFeedback | None = None  # vote buttons; None when FEEDBACK_DB is off
        self._closing = False

    async def setup_hook(self) -> None:
        """Runs after login, before the gateway connects: the place to register commands.

        The vote buttons are registered here too, by ``custom_id`` template, so
        clicks on answers written before a restart are still counted.
        """
        if self.settings.feedback_db is not None:
            self.feedback = await DiscordFeedback.open(
                self.settings.feedback_db, self.settings.engine
            )
            self.add_dynamic_items(self.feedback.button)
        assert self.user is not None, "setup_hook runs after login"
        self._answers = AnswerCog(
            self.engine,
            self.settings,
            bot_user_id=self.user.id,
            feedback=self.feedback,
            edit_interval_s=self.edit_interval_s,
        )
        await self.add_cog(self._answers)
        await self.add_cog(AdapterAdmin(self.engine, self.settings))
        if self.settings.guild_id is not None:
            # A guild sync is visible at once; a global one can take up to an hour.
            guild = discord.Object(id=self.settings.guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("registered %d commands in server %s", len(synced), self.settings.guild_id)
        else:
            synced = await self.tree.sync()
            log.info("registered %d global commands", len(synced))

    async def on_ready(self) -> None:
        log.info("connected as %s to %d servers", self.user, len(self.guilds))

    async def on_message(self, message: discord.Message, /) -> None:
        """No text commands: a mention is a question, and :class:`AnswerCog` answers it."""

    async def _on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        log.error("command %s failed", getattr(interaction.command, "name", "?"), exc_info=error)
        text = "Sorry, that command failed. The error was logged."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            pass

    async def close(self) -> None:
        """Stop taking questions, let running answers finish (then stop them with a note), disconnect."""
        if not self._closing:
            self._closing = True
            if self._answers is not None:
                await self._answers.drain(self.shutdown_grace_s)
        await super().close()
        if self.feedback is not None:  # after the last answer: its record is the last write
            feedback, self.feedback = self.feedback, None
            await feedback.close()
