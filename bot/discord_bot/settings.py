"""The Discord side's settings, read once from the environment and ``.env``.

Validated before discord.py or torch are imported, so a bad value stops
``python -m bot`` with one line that names the variable. The token is kept out
of ``repr`` and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bot.feedback.store import feedback_db_from_env
from bot.serving.env import (
    env_bool,
    env_int,
    env_str,
    load_env_file,
)
from bot.serving.settings import (
    EngineSettings,
    LogLevel,
    log_level_from_env,
    metrics_host_from_env,
    metrics_port_from_env,
)
from freeski_common.errors import UserError


def _env_list(name: str) -> list[str]:
    """Comma-separated values, blanks dropped (for allow lists of ids)."""
    raw = os.environ.get(name, "")
    return [part.strip() for part in raw.split(",") if part.strip()]


def env_id_list(name: str) -> list[int]:
    ids = []
    for part in _env_list(name):
        if not part.isdigit():
            raise UserError(
                f"{name} holds {part!r}, which is not a Discord id: use numeric ids, comma-separated"
            )
        ids.append(int(part))
    return ids


@dataclass(frozen=True)
class BotSettings:
    """The Discord side: who may ask, how often, and where commands are registered."""

    discord_token: str = field(repr=False)
    engine: EngineSettings
    guild_id: int | None = None
    rate_limit_per_minute: int = 6
    max_question_chars: int = 1500
    allowed_channel_ids: tuple[int, ...] = ()
    allowed_role_ids: tuple[int, ...] = ()
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_level: LogLevel = "INFO"
    feedback_db: Path | None = None  # None: no vote buttons
    # /compare hides which model wrote which side until a vote is cast (and /compare blind:…).
    compare_blind: bool = False
    # Who may use /adapters (load, unload, promote): these users, and members with these roles.
    admin_user_ids: tuple[int, ...] = ()
    admin_role_ids: tuple[int, ...] = ()

    @classmethod
    def from_env(cls, *, require_token: bool = True) -> BotSettings:
        load_env_file()
        token = env_str("DISCORD_TOKEN", required=require_token) or ""
        if token and (" " in token or len(token) < 20):
            raise UserError(
                "DISCORD_TOKEN does not look like a bot token: copy it from the Developer Portal's Bot page"
            )
        guild = env_str("DISCORD_GUILD_ID")
        if guild is not None and not guild.isdigit():
            raise UserError(
                f"DISCORD_GUILD_ID={guild!r} is not a server id: use the numeric id, or leave it unset"
            )
        return cls(
            discord_token=token,
            engine=EngineSettings.from_env(),
            guild_id=int(guild) if guild else None,
            rate_limit_per_minute=env_int(
                "RATE_LIMIT_PER_MINUTE", cls.rate_limit_per_minute, minimum=0
            ),
            max_question_chars=env_int("MAX_QUESTION_CHARS", cls.max_question_chars, minimum=1),
            allowed_channel_ids=tuple(env_id_list("ALLOWED_CHANNEL_IDS")),
            allowed_role_ids=tuple(env_id_list("ALLOWED_ROLE_IDS")),
            metrics_port=metrics_port_from_env(),
            metrics_host=metrics_host_from_env(),
            log_level=log_level_from_env(),
            feedback_db=feedback_db_from_env(),
            compare_blind=env_bool("COMPARE_BLIND", cls.compare_blind),
            admin_user_ids=tuple(env_id_list("ADMIN_USER_IDS")),
            admin_role_ids=tuple(env_id_list("ADMIN_ROLE_IDS")),
        )
