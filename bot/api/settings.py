"""``API_*`` settings of ``python -m bot api``."""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.serving.env import (
    env_bool,
    env_int,
    env_str,
    load_env_file,
)
from freeski_common.errors import UserError


@dataclass(frozen=True)
class ApiSettings:
    """The OpenAI-compatible HTTP API. Without a token it only listens on loopback."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str = field(default="", repr=False)
    max_request_bytes: int = 64 * 1024
    max_tokens_cap: int = 1024
    # Votes one web voter, and one client address, may send per minute (0: no limit).
    votes_per_minute: int = 30
    # Names besides localhost and loopback addresses a token-less API answers to (bot/api/access.py).
    allowed_hosts: tuple[str, ...] = ()
    max_messages: int = 256  # messages in one request; more is a 400
    rate_limit_per_minute: int = 60  # chat requests per client (token, else address); 0: off
    # POST /v1/load_lora_adapter and its siblings (vLLM's names); only behind API_TOKEN.
    runtime_adapter_updates: bool = False

    @classmethod
    def from_env(cls) -> ApiSettings:
        load_env_file()
        token = env_str("API_TOKEN", "") or ""
        runtime_adapter_updates = env_bool("RUNTIME_ADAPTER_UPDATES", cls.runtime_adapter_updates)
        if runtime_adapter_updates and not token:
            raise UserError(
                "RUNTIME_ADAPTER_UPDATES=true lets API clients load and unload adapters: "
                "set API_TOKEN to a secret too, or turn RUNTIME_ADAPTER_UPDATES off"
            )
        return cls(
            host=env_str("API_HOST", cls.host) or cls.host,
            port=env_int("API_PORT", cls.port, minimum=1),
            token=token,
            max_request_bytes=env_int("API_MAX_REQUEST_BYTES", cls.max_request_bytes, minimum=1024),
            max_tokens_cap=env_int("API_MAX_TOKENS", cls.max_tokens_cap, minimum=1),
            votes_per_minute=env_int("API_VOTES_PER_MINUTE", cls.votes_per_minute, minimum=0),
            allowed_hosts=tuple(
                name.strip()
                for name in (env_str("API_ALLOWED_HOSTS", "") or "").split(",")
                if name.strip()
            ),
            max_messages=env_int("API_MAX_MESSAGES", cls.max_messages, minimum=1),
            rate_limit_per_minute=env_int(
                "API_RATE_LIMIT_PER_MINUTE", cls.rate_limit_per_minute, minimum=0
            ),
            runtime_adapter_updates=runtime_adapter_updates,
        )
