"""``/adapters``: list, load, unload and promote the served adapters, for the bot's admins only.

Admins are the users in ``ADMIN_USER_IDS`` and the members holding a role in
``ADMIN_ROLE_IDS``; anyone else is refused politely and privately, and with
neither set nobody is an admin. Loading reads a directory on the bot's own
machine, which is why this is not left to Discord's permission settings
alone. Every reply is ephemeral: an adapter's path is the operator's business.

The engine does the work and says what is wrong in one line
(:class:`~bot.serving.engine.AdapterRejected`, :class:`~bot.serving.engine.UnknownModel`);
answers already running on an adapter being unloaded finish first.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_bot.served import name_choices
from bot.discord_bot.settings import BotSettings
from bot.serving.adapters import ServedModels
from bot.serving.engine import Engine, EngineError

log = logging.getLogger(__name__)

REFUSAL = "Sorry, managing the bot's adapters is for its admins."


def is_admin(settings: BotSettings, user: discord.User | discord.Member) -> bool:
    """Whether ``user`` is listed in ``ADMIN_USER_IDS`` or holds a role of ``ADMIN_ROLE_IDS``."""
    if user.id in settings.admin_user_ids:
        return True
    roles = {role.id for role in getattr(user, "roles", [])}
    return bool(roles & set(settings.admin_role_ids))


def adapters_text(served: ServedModels) -> str:
    """One line per served adapter: name, weights hash, where it was read; the default marked."""
    if not served.adapters:
        return "No adapter is served: only `base` answers."
    lines = [
        f"{'**' + a.name + '** (default, `finetuned`)' if a.name == served.default else a.name}"
        f" · weights `{(a.weights_hash or 'unknown')[:12]}` · `{a.path}`"
        for a in served.adapters
    ]
    return "\n".join(lines)


class AdapterAdmin(
    commands.GroupCog,
    group_name="adapters",
    group_description="List, load, unload and promote the served adapters (admins only)",
):
    def __init__(self, engine: Engine, settings: BotSettings) -> None:
        self.engine = engine
        self.settings = settings
        super().__init__()

    @app_commands.command(name="list", description="The served adapters and the default")
    async def list_(self, interaction: discord.Interaction) -> None:
        if await self._refused(interaction):
            return
        await interaction.response.send_message(adapters_text(self.engine.models()), ephemeral=True)

    @app_commands.command(name="load", description="Serve another adapter, without a restart")
    @app_commands.describe(
        name="The name to ask it by (lowercase letters, digits, . _ -)",
        path="Its directory on the bot's machine, e.g. runs/ski-v2/adapter",
    )
    async def load(self, interaction: discord.Interaction, name: str, path: str) -> None:
        if await self._refused(interaction):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            served = await self.engine.load_adapter(name, path)
        except EngineError as error:
            await interaction.edit_original_response(content=f"⚠️ {error}")
            return
        log.info("%s loaded adapter %s from %s", interaction.user.id, name, served.path)
        await interaction.edit_original_response(
            content=f"Loaded `{name}` (weights `{(served.weights_hash or 'unknown')[:12]}`): "
            f"try it with `/ask model:{name}` or `/compare a:{name} blind:true`."
        )

    @app_commands.command(name="unload", description="Stop serving an adapter")
    @app_commands.describe(name="The adapter to unload (not the default)")
    async def unload(self, interaction: discord.Interaction, name: str) -> None:
        if await self._refused(interaction):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            await self.engine.unload_adapter(name)
        except EngineError as error:
            await interaction.edit_original_response(content=f"⚠️ {error}")
            return
        log.info("%s unloaded adapter %s", interaction.user.id, name)
        await interaction.edit_original_response(content=f"Unloaded `{name}`.")

    @app_commands.command(name="promote", description="Make an adapter the default (finetuned)")
    @app_commands.describe(name="The adapter that answers mentions and 'finetuned' from now on")
    async def promote(self, interaction: discord.Interaction, name: str) -> None:
        if await self._refused(interaction):
            return
        try:
            served = await self.engine.set_default(name)
        except EngineError as error:
            await interaction.response.send_message(f"⚠️ {error}", ephemeral=True)
            return
        log.info("%s made adapter %s the default", interaction.user.id, name)
        await interaction.response.send_message(
            f"`{name}` now answers mentions and `finetuned`.\n{adapters_text(served)}",
            ephemeral=True,
        )

    @unload.autocomplete("name")
    @promote.autocomplete("name")
    async def _adapter_name(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if not is_admin(self.settings, interaction.user):
            return []
        return name_choices(self.engine.models(), current, adapters_only=True)

    async def _refused(self, interaction: discord.Interaction) -> bool:
        """Refuse anyone but an admin, privately; True when refused."""
        if is_admin(self.settings, interaction.user):
            return False
        await interaction.response.send_message(REFUSAL, ephemeral=True)
        return True
