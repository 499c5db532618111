"""A loopback stand-in for an OpenAI-compatible server (vLLM's dialect), with injectable failures.

It streams like vLLM: a role chunk, one chunk per word, a chunk with the
finish reason, a usage chunk when asked, then ``data: [DONE]``. Tests queue
what the next requests get instead (an error status with ``Retry-After``, a
connection that hangs, a stream that breaks) and read back what was asked.
With ``sampling`` on, it samples like the scripted engine: a request's
``temperature`` above 0 draws the words' order, from its ``seed`` when it has one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.loopback import serve_app
from tests.scripted_engine import scripted_words

MODELS = {"base-model-id": "base", "freeski-lora": "finetuned"}


@dataclass
class Failure:
    """What one request gets instead of an answer."""

    status: int = 503
    retry_after: str | None = None
    message: str = "scripted failure"
    hang: bool = False  # accept the request, then never answer
    cut_after_words: int | None = None  # stream this many words, then drop the connection
    error_event_after_words: int | None = None  # stream, then send an error event
    garbage_after_words: int | None = None  # stream, then send a chunk that is not JSON

    @property
    def refuses(self) -> bool:
        """Answers with the error status rather than starting a stream."""
        return not self.hang and all(
            after is None
            for after in (
                self.cut_after_words,
                self.error_event_after_words,
                self.garbage_after_words,
            )
        )


@dataclass
class FakeOpenAIServer:
    api_key: str = ""
    step_s: float = 0.0
    models: dict[str, str] = field(default_factory=lambda: dict(MODELS))
    port: int = 0
    script: list[Failure] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    # Fields outside OpenAI's own that this server refuses, as `transformers serve` does
    # (422 {"detail": "Unexpected fields in the request: {...}"}); vLLM takes them.
    refused_fields: frozenset[str] = frozenset()
    sampling: bool = False  # off: every answer is the greedy one, whatever was asked

    url: str = ""  # http://127.0.0.1:PORT/v1 once started

    async def __aenter__(self) -> FakeOpenAIServer:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._serving = serve_app(app, self.port)
        self.url = await self._serving.__aenter__() + "/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()  # hanging requests end, so the server stops at once
        await self._serving.__aexit__(None, None, None)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "bad key")
        unexpected = self.refused_fields & body.keys()
        if unexpected:
            detail = f"Unexpected fields in the request: {set(sorted(unexpected))}"
            return web.json_response({"detail": detail}, status=422)
        failure = self.script.pop(0) if self.script else None
        if failure is not None and failure.hang:
            await self._release.wait()
            return _error(503, "released")
        if failure is not None and failure.refuses:
            headers = {"Retry-After": failure.retry_after} if failure.retry_after else {}
            return _error(failure.status, failure.message, headers)
        if body.get("model") not in self.models:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._stream(request, body, failure)
        finally:
            self.in_flight -= 1

    async def _stream(
        self, request: web.Request, body: dict[str, Any], failure: Failure | None
    ) -> web.StreamResponse:
        variant = self.models[body["model"]]
        words = scripted_words(
            body["messages"],
            variant,  # type: ignore[arg-type]
            temperature=(body.get("temperature") or 0.0) if self.sampling else 0.0,
            seed=body.get("seed"),
        )
        limit = body.get("max_tokens") or 16
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words[:limit])]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(choices: Sequence[dict[str, Any]], **extra: Any) -> None:
            event = {"id": "cmpl-1", "object": "chat.completion.chunk", "model": body["model"]}
            event.update(choices=list(choices), **extra)
            await response.write(f"data: {json.dumps(event)}\n\n".encode())

        await send([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
        for i, piece in enumerate(pieces):
            if failure is not None and i == failure.cut_after_words:
                assert request.transport is not None
                request.transport.close()
                return response
            if failure is not None and i == failure.error_event_after_words:
                await response.write(
                    b'data: {"error": {"message": "engine died", "code": 500}}\n\n'
                )
                await response.write(b"data: [DONE]\n\n")
                return response
            if failure is not None and i == failure.garbage_after_words:
                await response.write(b"data: {not json\n\n")
                return response
            await asyncio.sleep(self.step_s)
            await send([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        finish = "length" if len(words) > limit else "stop"
        await send([{"index": 0, "delta": {}, "finish_reason": finish}])
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 7, "completion_tokens": len(pieces)}
            await send([], usage={**usage, "total_tokens": 7 + len(pieces)})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "error", "code": status}}
    return web.json_response(body, status=status, headers=headers)
