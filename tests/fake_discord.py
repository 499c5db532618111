"""A loopback Discord for end-to-end bot tests: the REST routes the bot uses and the gateway.

One aiohttp server on 127.0.0.1 plays both halves of Discord. REST calls are
recorded (method, path, JSON body) so tests assert on what the bot sent;
messages are stored (with their components) so the bot can fetch a reply
chain back. The gateway speaks HELLO → IDENTIFY → READY → GUILD_CREATE,
acknowledges heartbeats, and lets a test push MESSAGE_CREATE and
INTERACTION_CREATE as a user would: slash commands (type 2) and button clicks
(type 3, carrying the clicked message and the button's ``custom_id``).

Point discord.py at it with :meth:`FakeDiscord.patch_discord` before login;
the bot's own code is not changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import discord
import discord.gateway
import discord.http
import yarl
from aiohttp import WSMsgType, web

from bot.discord_bot.replies import STREAMING_MARK

BOT_ID = 900000000000000001
APP_ID = 900000000000000002
GUILD_ID = 900000000000000003
CHANNEL_ID = 900000000000000004
USER_ID = 900000000000000005
OTHER_CHANNEL_ID = 900000000000000006
ADMIN_ROLE_ID = 900000000000000007  # a guild role, "ski-admins", no member holds by default
EVERYONE_PERMISSIONS = str(discord.Permissions.all().value)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """discord.py parses a body as JSON only when the content type is exactly ``application/json``."""
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def user_payload(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "discriminator": "0",
        "global_name": name,
        "avatar": None,
        "bot": bot,
    }


def member_payload(user: dict[str, Any] | None = None, roles: list[int] | None = None) -> dict:
    payload: dict[str, Any] = {
        "roles": [str(r) for r in roles or []],
        "joined_at": _now(),
        "deaf": False,
        "mute": False,
        "flags": 0,
    }
    if user is not None:
        payload["user"] = user
    return payload


def custom_ids(message: dict[str, Any]) -> list[str]:
    """The ``custom_id`` of every button on a message, row by row."""
    return [
        component["custom_id"]
        for row in message.get("components") or []
        for component in row.get("components", [])
        if "custom_id" in component
    ]


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: dict[str, Any] | None
    at: float = field(default_factory=time.monotonic)  # when it arrived, for ack deadlines


@dataclass
class FakeDiscord:
    """The fake server; every id it hands out is a fresh snowflake."""

    bot_user: dict[str, Any] = field(
        default_factory=lambda: user_payload(BOT_ID, "freeski", bot=True)
    )
    user: dict[str, Any] = field(default_factory=lambda: user_payload(USER_ID, "skier"))
    calls: list[Call] = field(default_factory=list)
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)
    interactions: dict[str, dict[str, Any]] = field(default_factory=dict)  # id → payload sent
    commands: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # scope → commands
    rate_limit_next: dict[str, int] = field(default_factory=dict)  # "METHOD path-prefix" → times
    reject_token: bool = False  # answer logins with 401, as for a revoked token
    port: int = 0

    def __post_init__(self) -> None:
        self._ids = itertools.count(910000000000000000)
        self._sequence = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._identified = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.changed = asyncio.Condition()

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def patch_discord(self, monkeypatch: Any) -> None:
        """Send the bot's REST calls and gateway connection here."""
        monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{self.port}/api/v10")
        monkeypatch.setattr(
            discord.gateway.DiscordWebSocket,
            "DEFAULT_GATEWAY",
            yarl.URL(f"ws://127.0.0.1:{self.port}/"),
        )

    def next_id(self) -> int:
        return next(self._ids)

    async def connected(self, timeout: float = 10.0) -> None:
        """Wait until a client has identified on the gateway."""
        await asyncio.wait_for(self._identified.wait(), timeout)

    # ---- what tests do as users ------------------------------------------------------

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        await self._identified.wait()
        payload = {"op": 0, "t": event, "s": next(self._sequence), "d": data}
        for ws in self._sockets:
            await ws.send_str(json.dumps(payload))

    async def user_says(
        self,
        content: str,
        *,
        mention_bot: bool = True,
        reply_to: int | None = None,
        channel_id: int = CHANNEL_ID,
        roles: list[int] | None = None,
        author: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A user posts ``content`` in the guild channel (mentioning the bot unless told not to)."""
        author = author or self.user
        message = self._message(
            channel_id, author, (f"<@{BOT_ID}> " if mention_bot else "") + content
        )
        message["member"] = member_payload(roles=roles)
        message["mentions"] = [self.bot_user] if mention_bot else []
        if reply_to is not None:
            parent = self.messages[reply_to]
            message["type"] = 19
            message["message_reference"] = {
                "message_id": str(reply_to),
                "channel_id": str(channel_id),
                "guild_id": str(GUILD_ID),
            }
            message["referenced_message"] = parent
        self.messages[int(message["id"])] = message
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    async def delete_message(self, message_id: int, channel_id: int = CHANNEL_ID) -> None:
        self.messages.pop(message_id, None)
        await self.dispatch(
            "MESSAGE_DELETE",
            {"id": str(message_id), "channel_id": str(channel_id), "guild_id": str(GUILD_ID)},
        )

    def _interaction(
        self, kind: int, user: dict[str, Any] | None, roles: list[int] | None = None
    ) -> dict[str, Any]:
        interaction = {
            "id": str(self.next_id()),
            "application_id": str(APP_ID),
            "type": kind,
            "token": f"interaction-token-{self.next_id()}",
            "version": 1,
            "guild_id": str(GUILD_ID),
            "channel_id": str(CHANNEL_ID),
            "channel": {"id": str(CHANNEL_ID), "type": 0, "guild_id": str(GUILD_ID)},
            "member": {
                **member_payload(user or self.user, roles),
                "permissions": EVERYONE_PERMISSIONS,
            },
            "app_permissions": EVERYONE_PERMISSIONS,
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 8 * 1024 * 1024,
            "authorizing_integration_owners": {"0": str(GUILD_ID)},
            "context": 0,
        }
        self.interactions[interaction["id"]] = interaction
        return interaction

    async def slash_command(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user: dict | None = None,
        roles: list[int] | None = None,
    ) -> dict[str, Any]:
        """A user (holding ``roles``) runs ``/name`` in the guild channel; returns the interaction.

        ``name`` may name a subcommand (``"adapters load"``); ``options`` are
        sent typed as Discord sends them (a bool as a boolean option).
        """
        interaction = self._interaction(2, user, roles)
        interaction["data"] = self._command_data(name, options or {})
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    async def autocomplete(
        self, name: str, options: dict[str, Any], focused: str, *, user: dict | None = None
    ) -> list[dict[str, Any]]:
        """A user types into option ``focused`` of ``/name``; the choices the bot offers."""
        interaction = self._interaction(4, user)
        interaction["data"] = self._command_data(name, options, focused=focused)
        await self.dispatch("INTERACTION_CREATE", interaction)
        callback = await self.wait_for(lambda: self.callback_for(interaction))
        assert callback.body["type"] == 8, callback.body
        choices: list[dict[str, Any]] = callback.body["data"]["choices"]
        return choices

    def _command_data(
        self, name: str, options: dict[str, Any], *, focused: str | None = None
    ) -> dict[str, Any]:
        top, *sub = name.split()
        command = next(c for c in self.commands.get(f"guild:{GUILD_ID}", []) if c["name"] == top)
        sent = [
            {
                "name": key,
                "type": 5 if isinstance(value, bool) else 3,
                "value": value,
                **({"focused": True} if key == focused else {}),
            }
            for key, value in options.items()
        ]
        if sub:  # a subcommand carries the options
            sent = [{"name": sub[0], "type": 1, "options": sent}]
        return {
            "id": command["id"],
            "name": top,
            "type": 1,
            "guild_id": str(GUILD_ID),
            "options": sent,
        }

    async def click(
        self, message_id: int | str, custom_id: str, *, user: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A user clicks the button ``custom_id`` under a message; returns the interaction payload.

        Like Discord, the click names any ``custom_id`` the message carries; a
        button that is not on the message cannot be clicked.
        """
        message = self.messages[int(message_id)]
        if custom_id not in custom_ids(message):
            raise AssertionError(f"message {message_id} has no button {custom_id!r}")
        interaction = self._interaction(3, user)
        interaction["message"] = message
        interaction["data"] = {"custom_id": custom_id, "component_type": 2}
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    def callback_for(self, interaction: dict[str, Any]) -> Call | None:
        """The bot's answer to an interaction (its first callback), if it came."""
        path = f"/interactions/{interaction['id']}/{interaction['token']}/callback"
        return next((c for c in self.calls if c.path == path), None)

    def followups_for(self, interaction: dict[str, Any]) -> list[dict[str, Any]]:
        token = interaction["token"]
        return [m for m in self.messages.values() if m.get("followup_token") == token]

    # ---- what tests assert on --------------------------------------------------------

    def calls_to(self, method: str, path_part: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and path_part in c.path]

    def bot_messages(self) -> list[dict[str, Any]]:
        return [m for m in self.messages.values() if m["author"]["id"] == str(BOT_ID)]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until ``predicate()`` is truthy after some request; return its value."""

        async def poll() -> Any:
            async with self.changed:
                while not (result := predicate()):
                    await self.changed.wait()
                return result

        return await asyncio.wait_for(poll(), timeout)

    # ---- REST ------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body = None
        if request.can_read_body:
            if request.content_type == "application/json":
                body = await request.json()
            elif request.content_type.startswith("multipart/"):
                body = await self._multipart_json(request)
        self.calls.append(Call(request.method, path, dict(request.query), body))
        try:
            key = next(
                (k for k in self.rate_limit_next if f"{request.method} {path}".startswith(k)),
                None,
            )
            if key is not None and self.rate_limit_next[key] > 0:
                self.rate_limit_next[key] -= 1
                # A real 429: a Via header and retry_after in the body, else discord.py gives up.
                return _json(
                    {"message": "You are being rate limited.", "retry_after": 0.2, "global": False},
                    status=429,
                    headers={"Via": "1.1 google", "X-RateLimit-Scope": "user"},
                )
            return await self._route(request.method, path, request, body)
        finally:
            async with self.changed:
                self.changed.notify_all()

    @staticmethod
    async def _multipart_json(request: web.Request) -> dict[str, Any] | None:
        reader = await request.multipart()
        async for part in reader:
            if part.name == "payload_json":  # type: ignore[union-attr]
                return json.loads(await part.text())  # type: ignore[union-attr]
        return None

    async def _route(
        self, method: str, path: str, request: web.Request, body: dict[str, Any] | None
    ) -> web.StreamResponse:
        parts = path.strip("/").split("/")
        if (method, path) == ("GET", "/users/@me"):
            if self.reject_token:
                return _json({"message": "401: Unauthorized", "code": 0}, 401)
            return _json(self.bot_user)
        if (method, path) == ("GET", "/oauth2/applications/@me"):
            return _json(self._application())
        if method == "PUT" and parts[0] == "applications" and parts[-1] == "commands":
            scope = f"guild:{parts[3]}" if "guilds" in parts else "global"
            self.commands[scope] = [
                {
                    **command,
                    "id": str(self.next_id()),
                    "application_id": str(APP_ID),
                    "version": "1",
                    "default_member_permissions": None,
                    "dm_permission": True,
                    "nsfw": False,
                    **({"guild_id": parts[3]} if "guilds" in parts else {}),
                }
                for command in body or []
            ]
            return _json(self.commands[scope])
        if parts[0] == "channels":
            return await self._channel_route(method, parts, body)
        if parts[0] == "interactions" and parts[-1] == "callback":
            return self._interaction_callback(parts[1], parts[2], body or {}, request.query)
        if parts[0] == "webhooks":
            return self._webhook_route(method, parts, body or {})
        return _json({"message": f"fake Discord has no route {method} {path}", "code": 0}, 404)

    async def _channel_route(
        self, method: str, parts: list[str], body: dict[str, Any] | None
    ) -> web.StreamResponse:
        channel_id = int(parts[1])
        if parts[-1] == "typing":
            return web.Response(status=204)
        if method == "POST" and parts[-1] == "messages":
            message = self._message(channel_id, self.bot_user, body.get("content") or "")
            message["embeds"] = body.get("embeds") or []
            message["components"] = body.get("components") or []
            message["sent_allowed_mentions"] = body.get("allowed_mentions")
            reference = body.get("message_reference")
            if reference:
                message["type"] = 19
                message["message_reference"] = {
                    key: str(value) for key, value in reference.items() if key.endswith("_id")
                }
                message["referenced_message"] = self.messages.get(int(reference["message_id"]))
            self.messages[int(message["id"])] = message
            return _json(message)
        message_id = int(parts[3])
        message = self.messages.get(message_id)
        if message is None:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        if method == "GET":
            return _json(message)
        if method == "PATCH":
            return _json(self._edit(message, body or {}))
        if method == "DELETE":
            del self.messages[message_id]
            return web.Response(status=204)
        return _json({"message": "unsupported", "code": 0}, 405)

    def _interaction_callback(
        self, interaction_id: str, token: str, body: dict[str, Any], query: Any
    ) -> web.StreamResponse:
        kind = body.get("type")
        data = body.get("data") or {}
        interaction = self.interactions.get(interaction_id, {})
        if kind == 8:  # autocomplete choices: no message
            return web.Response(status=204)
        if kind in (6, 7) and "message" in interaction:  # update the clicked message in place
            message = self.messages[int(interaction["message"]["id"])]
            if kind == 7:
                self._edit(message, data)
        else:
            message = self._message(CHANNEL_ID, self.bot_user, data.get("content") or "")
            message["embeds"] = data.get("embeds") or []
            message["components"] = data.get("components") or []
            message["sent_allowed_mentions"] = data.get("allowed_mentions")
            message["interaction_token"] = token
            message["flags"] = data.get("flags", 0)
            self.messages[int(message["id"])] = message
        if query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        return _json(
            {
                "interaction": {
                    "id": interaction_id,
                    "type": interaction.get("type", 2),
                    "response_message_id": message["id"],
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": bool(message["flags"] & 64),
                },
                "resource": {"type": kind, "message": message},
            }
        )

    def _webhook_route(
        self, method: str, parts: list[str], body: dict[str, Any]
    ) -> web.StreamResponse:
        token = parts[2]
        if method == "PATCH" and parts[-1] == "@original":
            original = next(
                (m for m in self.messages.values() if m.get("interaction_token") == token), None
            )
            if original is None:
                return _json({"message": "Unknown Webhook", "code": 10015}, 404)
            return _json(self._edit(original, body))
        if method == "POST" and len(parts) == 3:  # a followup
            message = self._message(CHANNEL_ID, self.bot_user, body.get("content") or "")
            message["embeds"] = body.get("embeds") or []
            message["components"] = body.get("components") or []
            message["sent_allowed_mentions"] = body.get("allowed_mentions")
            message["followup_token"] = token
            message["flags"] = body.get("flags", 0)
            self.messages[int(message["id"])] = message
            return _json(message)
        return _json({"message": "unsupported", "code": 0}, 405)

    # ---- payloads --------------------------------------------------------------------

    def _message(self, channel_id: int, author: dict[str, Any], content: str) -> dict[str, Any]:
        return {
            "id": str(self.next_id()),
            "channel_id": str(channel_id),
            "guild_id": str(GUILD_ID),
            "author": author,
            "content": content,
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
            "edits": 0,
        }

    @staticmethod
    def _edit(message: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        if "content" in body:
            message["content"] = body["content"] or ""
        if "embeds" in body:
            message["embeds"] = body["embeds"] or []
        if "components" in body:  # Discord keeps a message's buttons unless an edit replaces them
            message["components"] = body["components"] or []
        message["edited_timestamp"] = _now()
        message["edits"] = message.get("edits", 0) + 1
        message["sent_allowed_mentions"] = body.get(
            "allowed_mentions", message.get("sent_allowed_mentions")
        )
        return message

    def _application(self) -> dict[str, Any]:
        return {
            "id": str(APP_ID),
            "name": "freeski",
            "icon": None,
            "description": "",
            "rpc_origins": [],
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.user,
            "summary": "",
            "verify_key": "0" * 64,
            "team": None,
            "flags": 0,
        }

    def _guild(self) -> dict[str, Any]:
        channel = {"type": 0, "position": 0, "permission_overwrites": [], "nsfw": False}
        return {
            "id": str(GUILD_ID),
            "name": "ski club",
            "icon": None,
            "owner_id": str(USER_ID),
            "unavailable": False,
            "large": False,
            "member_count": 2,
            "features": [],
            "emojis": [],
            "stickers": [],
            "roles": [
                {
                    "id": str(GUILD_ID),
                    "name": "@everyone",
                    "permissions": EVERYONE_PERMISSIONS,
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "flags": 0,
                },
                {
                    "id": str(ADMIN_ROLE_ID),
                    "name": "ski-admins",
                    "permissions": "0",
                    "position": 1,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "flags": 0,
                },
            ],
            "channels": [
                {**channel, "id": str(CHANNEL_ID), "name": "ski-talk"},
                {**channel, "id": str(OTHER_CHANNEL_ID), "name": "off-topic", "position": 1},
            ],
            "members": [member_payload(self.bot_user)],
            "threads": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    # ---- gateway ---------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 30000}}))
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                message = json.loads(frame.data)
                if message["op"] == 1:  # heartbeat
                    await ws.send_str(json.dumps({"op": 11}))
                elif message["op"] == 2:  # identify
                    await self._ready(ws)
        finally:
            self._sockets.remove(ws)
        return ws

    async def _ready(self, ws: web.WebSocketResponse) -> None:
        ready = {
            "v": 10,
            "user": self.bot_user,
            "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
            "session_id": "fake-session",
            "resume_gateway_url": f"ws://127.0.0.1:{self.port}/",
            "application": {"id": str(APP_ID), "flags": 0},
            "private_channels": [],
            "relationships": [],
        }
        await ws.send_str(
            json.dumps({"op": 0, "t": "READY", "s": next(self._sequence), "d": ready})
        )
        await ws.send_str(
            json.dumps(
                {"op": 0, "t": "GUILD_CREATE", "s": next(self._sequence), "d": self._guild()}
            )
        )
        self._identified.set()


def final_comparison(fake: FakeDiscord, token: str) -> dict | None:
    """The /compare response once both answers are final (previews end with the streaming mark)."""
    original = next(
        (m for m in fake.messages.values() if m.get("interaction_token") == token), None
    )
    if not original or not original["embeds"]:
        return None
    fields = original["embeds"][0]["fields"]
    return None if any(f["value"].endswith(STREAMING_MARK.strip()) for f in fields) else original
