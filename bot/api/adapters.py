"""Runtime adapter updates over HTTP, in vLLM's dialect: load, unload, and choose the default.

``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` take the
bodies vLLM takes (``lora_name``, ``lora_path``), so an operator's scripts for
vLLM work here; ``POST /v1/set_default_adapter`` (``lora_name``) is this API's
own, since vLLM has no default adapter: it re-points ``finetuned`` (and
Discord mentions) at another loaded adapter. Every route answers with the
adapters served after the change. ``GET /v1/adapters`` (always on, read-only)
lists them, with each one's results against base when votes are kept: the
HTTP side of Discord's ``/status``.

Only with ``RUNTIME_ADAPTER_UPDATES=true``, which the settings allow only
with ``API_TOKEN`` set, and behind the same bearer check as every ``/v1/``
route: loading reads files from the server's disk. When off, the routes are a
404 that says how to turn them on, as vLLM leaves them out without its flag.
What can go wrong maps to the status codes vLLM uses: a name not served is a
404 ``model_not_found``, a refused load or unload a 400 saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from bot.api.protocol import (
    ApiError,
    LoadLoraAdapterRequest,
    LoraNameRequest,
    adapters_body,
    decode_json_body,
    parse_body,
)
from bot.feedback.leaderboard import Leaderboard
from bot.serving.engine import Engine

log = logging.getLogger(__name__)

LIST = "/v1/adapters"
LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
SET_DEFAULT = "/v1/set_default_adapter"
OFF = (
    "Runtime adapter updates are off on this server: set RUNTIME_ADAPTER_UPDATES=true "
    "(with API_TOKEN) to load and unload adapters while it runs."
)


# The community's leaderboard, read off the event loop (None: no feedback store).
ReadLeaderboard = Callable[[], Awaitable[Leaderboard]]


class AdapterRoutes:
    """The routes over one engine; the engine does the work and says what went wrong."""

    def __init__(
        self, engine: Engine, *, enabled: bool, leaderboard: ReadLeaderboard | None = None
    ) -> None:
        self._engine = engine
        self._enabled = enabled
        self._leaderboard = leaderboard

    def install(self, app: web.Application) -> None:
        app.router.add_get(LIST, self.list_adapters)
        app.router.add_post(LOAD, self.load)
        app.router.add_post(UNLOAD, self.unload)
        app.router.add_post(SET_DEFAULT, self.set_default)

    async def list_adapters(self, request: web.Request) -> web.Response:
        """The served adapters and, with a feedback store, each one's results against base."""
        served = self._engine.models()
        vs_base = None
        if self._leaderboard is not None:
            board = await self._leaderboard()
            vs_base = board.against_base_of({a.name: a.weights_hash for a in served.adapters})
        return web.json_response(adapters_body(served, vs_base))

    async def load(self, request: web.Request) -> web.Response:
        body = parse_body(LoadLoraAdapterRequest, await self._body(request))
        served = await self._engine.load_adapter(body.lora_name, body.lora_path)
        log.info("API client loaded adapter %s from %s", served.name, served.path)
        return web.json_response(adapters_body(self._engine.models()))

    async def unload(self, request: web.Request) -> web.Response:
        body = parse_body(LoraNameRequest, await self._body(request))
        await self._engine.unload_adapter(body.lora_name)
        log.info("API client unloaded adapter %s", body.lora_name)
        return web.json_response(adapters_body(self._engine.models()))

    async def set_default(self, request: web.Request) -> web.Response:
        body = parse_body(LoraNameRequest, await self._body(request))
        served = await self._engine.set_default(body.lora_name)
        log.info("API client made adapter %s the default", body.lora_name)
        return web.json_response(adapters_body(served))

    async def _body(self, request: web.Request) -> object:
        if not self._enabled:
            raise ApiError(404, OFF, code="runtime_adapter_updates_off")
        return decode_json_body(await request.read())
