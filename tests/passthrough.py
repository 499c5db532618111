"""A loopback pass-through in front of a real server, like a load balancer that can fail on cue.

It forwards every request unchanged and streams the answer back as it comes.
A test can make the next requests fail with a status of its choosing
(``fail_next``), and reads back every request body it forwarded. When the
server behind it dies mid-answer, it drops the client's connection too, as a
proxy without buffering does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.loopback import serve_app


@dataclass
class Passthrough:
    upstream: str  # http://127.0.0.1:PORT
    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    url: str = ""  # http://127.0.0.1:PORT/v1 once started

    def fail_next(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.failures.append((status, headers or {}))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Passthrough]:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            self._session = session
            async with serve_app(app) as url:
                self.url = url + "/v1"
                yield self

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if request.method == "POST":
            self.bodies.append(json.loads(raw))
        if self.failures:
            status, headers = self.failures.pop(0)
            self.statuses.append(status)
            body = {"error": {"message": "scripted by the test", "type": "unavailable"}}
            return web.json_response(body, status=status, headers=headers)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        try:
            opened = await self._session.request(
                request.method, self.upstream + request.path_qs, data=raw, headers=headers
            )
        except aiohttp.ClientConnectionError:  # nothing behind it: a balancer's 502
            self.statuses.append(502)
            return web.json_response({"error": {"message": "no upstream"}}, status=502)
        async with opened as upstream:
            self.statuses.append(upstream.status)
            response = web.StreamResponse(status=upstream.status)
            for name in ("Content-Type", "Retry-After"):
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            try:
                async for piece in upstream.content.iter_any():
                    await response.write(piece)
            except aiohttp.ClientError:  # the server died mid-answer: so does this connection
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write_eof()
            return response
