"""An OpenAI-compatible chat API over the bot's engine, for web front ends and other bots.

``POST /v1/chat/completions`` speaks enough of OpenAI's protocol for its
clients (and for :class:`~bot.openai_engine.OpenAIEngine`, so one Freeski bot
can answer for another): models ``base`` and ``finetuned``, plain JSON or
``stream: true`` server-sent events. It is served by the same
:class:`~bot.engine.Engine` and queue as the Discord bot: :func:`create_app`
takes a running engine, so both front ends can live in one process and share
one model.

Sampling parameters in a request (``temperature``, ``top_p``, ``stop``) are
accepted and ignored: the operator's engine settings decide them, as they do
for Discord.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from bot.engine import (
    Answer,
    Engine,
    EngineBusy,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    Message,
    Variant,
)
from bot.engine_factory import build_engine
from bot.metrics_server import start_metrics_server
from bot.settings import ApiSettings, EngineSettings, log_level_from_env, metrics_port_from_env
from finetune.chat import ConversationError, normalize_conversation
from finetune.errors import UserError, cli_entry

log = logging.getLogger(__name__)

# OpenAI's newer "developer" role is what older servers call "system".
ROLES: Mapping[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A request the API answers with an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


@dataclass(frozen=True)
class ChatRequest:
    """A validated ``/v1/chat/completions`` request."""

    model: str
    variant: Variant
    messages: list[Message]
    max_tokens: int | None
    stream: bool
    include_usage: bool


def model_names(engine_settings: EngineSettings | None = None) -> dict[str, Variant]:
    """Every model name the API answers to.

    ``base`` and ``finetuned`` always; also the names an
    :class:`~bot.openai_engine.OpenAIEngine` is configured to ask a vLLM server
    for, so a bot set up for vLLM works unchanged against this API.
    """
    names: dict[str, Variant] = {"base": "base", "finetuned": "finetuned"}
    if engine_settings is not None:
        names.setdefault(engine_settings.base_model_name, "base")
        names.setdefault(engine_settings.base_model, "base")
        names.setdefault(engine_settings.finetuned_model_name, "finetuned")
    return names


def parse_chat_request(
    body: Any, *, models: Mapping[str, Variant], max_tokens_cap: int
) -> ChatRequest:
    """Check a decoded request body; every problem names the offending field."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: use 'base' or 'finetuned'.", param="model")
    if model not in models:
        raise ApiError(
            404,
            f"The model {model!r} does not exist: use one of {', '.join(sorted(models))}.",
            param="model",
            code="model_not_found",
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "'max_tokens' must be a positive integer.", param="max_tokens")
        if max_tokens > max_tokens_cap:
            raise ApiError(
                400,
                f"'max_tokens' is {max_tokens}; this server allows at most {max_tokens_cap}.",
                param="max_tokens",
            )
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "Only 'n': 1 is supported.", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object.", param="stream_options")
    return ChatRequest(
        model=model,
        variant=models[model],
        messages=_parse_messages(body.get("messages")),
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def _parse_messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list.", param="messages")
    messages: list[Message] = []
    for index, item in enumerate(raw):
        param = f"messages[{index}]"
        if not isinstance(item, dict):
            raise ApiError(
                400, f"{param} must be an object with 'role' and 'content'.", param=param
            )
        role_name = item.get("role")
        role = ROLES.get(role_name) if isinstance(role_name, str) else None
        if role is None:
            raise ApiError(
                400,
                f"{param}.role must be 'system', 'user' or 'assistant'.",
                param=f"{param}.role",
            )
        messages.append(Message(role=role, content=_text_content(item.get("content"), param)))
    try:  # the engines normalize the rest (repeated roles, extra system messages)
        normalize_conversation(messages)  # type: ignore[arg-type]
    except ConversationError:
        raise ApiError(
            400, "'messages' must include a user message to answer.", param="messages"
        ) from None
    return messages


def _text_content(content: Any, param: str) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise ApiError(
        400, f"{param}.content must be a string (text parts only).", param=f"{param}.content"
    )


class ChatApi:
    """The routes, bound to one engine and one set of limits."""

    def __init__(
        self,
        engine: Engine,
        settings: ApiSettings,
        models: Mapping[str, Variant],
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._models = dict(models)
        self._created = int(time.time())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(
                413,
                f"The request body is larger than this server's {self._settings.max_request_bytes} bytes.",
                code="request_too_large",
            ) from None
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(400, f"The request body is not valid JSON: {error}.") from None
        chat = parse_chat_request(
            body, models=self._models, max_tokens_cap=self._settings.max_tokens_cap
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return await self._stream(request, chat, completion_id)
        answer = await self._engine.generate(
            chat.messages, variant=chat.variant, max_new_tokens=chat.max_tokens
        )
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": chat.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer.text},
                        "finish_reason": answer.finish_reason,
                    }
                ],
                "usage": _usage(answer),
            }
        )

    async def _stream(
        self, request: web.Request, chat: ChatRequest, completion_id: str
    ) -> web.StreamResponse:
        """Stream an answer as server-sent events.

        Nothing is sent until the engine has produced text or failed, so a full
        queue or a dead server still gets its proper status code (429, 503…)
        rather than a 200 stream that breaks.
        """
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        task = asyncio.ensure_future(
            self._engine.generate(
                chat.messages,
                variant=chat.variant,
                max_new_tokens=chat.max_tokens,
                on_text=pieces.put_nowait,
            )
        )
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        created = int(time.time())

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }

        try:
            piece = await pieces.get()
            if piece is None:
                task.result()  # failed before any text: raise for a proper status code
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",  # nginx: pass events on as they come
                }
            )
            await response.prepare(request)
            try:
                await _send(response, chunk({"role": "assistant", "content": ""}))
                while piece is not None:
                    await _send(response, chunk({"content": piece}))
                    piece = await pieces.get()
                try:
                    answer = task.result()
                except Exception as error:
                    # Too late for a status code: say it in the stream, as vLLM does.
                    if not isinstance(error, EngineError):
                        log.error("answer %s failed", completion_id, exc_info=error)
                    await _send(response, _error_event(error))
                else:
                    await _send(response, chunk({}, answer.finish_reason))
                    if chat.include_usage:
                        await _send(response, {**chunk({}), "choices": [], "usage": _usage(answer)})
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
            except ConnectionResetError:
                log.debug("client left before %s finished", completion_id)
            return response
        finally:
            if not task.done():  # the client went away: free the engine's slot
                task.cancel()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": self._created,
                        "owned_by": "freeski-bot",
                        "root": variant,
                    }
                    for name, variant in self._models.items()
                ],
            }
        )

    async def healthz(self, request: web.Request) -> web.Response:
        status = self._engine.status()
        return web.json_response(
            {
                "status": "ok" if status.ready else "unavailable",
                "engine": dataclasses.asdict(status),
            },
            status=200 if status.ready else 503,
        )


def create_app(
    engine: Engine,
    settings: ApiSettings,
    *,
    engine_settings: EngineSettings | None = None,
) -> web.Application:
    """The API over an engine someone else starts and closes (the bot, or :func:`serve`)."""
    api = ChatApi(engine, settings, model_names(engine_settings))
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        middlewares=[_openai_errors, _bearer_auth(settings.token)],
    )
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/healthz", api.healthz)
    return app


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OpenAI-style JSON error, which is what clients parse."""
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except EngineBusy as error:
        retry_after = str(max(1, math.ceil(error.retry_after_s)))
        return ApiError(
            429,
            str(error),
            type="rate_limit_error",
            code="busy",
            headers={"Retry-After": retry_after},
        ).response()
    except EngineTimeout as error:
        return ApiError(504, str(error), type="timeout", code="timeout").response()
    except EngineUnavailable as error:
        return ApiError(503, str(error), type="service_unavailable").response()
    except EngineError as error:
        return ApiError(500, str(error), type="server_error").response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {name: error.headers[name] for name in ("Allow",) if name in error.headers}
        return ApiError(error.status, error.reason, headers=headers).response()
    except Exception:
        log.exception("unexpected failure serving %s %s", request.method, request.path)
        return ApiError(500, "Internal server error.", type="server_error").response()


def _bearer_auth(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Require ``Authorization: Bearer <API_TOKEN>`` on ``/v1/`` when a token is set."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(
                    401,
                    "Missing or wrong API key: send 'Authorization: Bearer <API_TOKEN>'.",
                    type="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return check


async def _send(response: web.StreamResponse, event: Mapping[str, Any]) -> None:
    await response.write(f"data: {json.dumps(event)}\n\n".encode())


def _error_event(error: Exception) -> dict[str, Any]:
    if isinstance(error, EngineTimeout):
        kind = "timeout"
    elif isinstance(error, EngineUnavailable):
        kind = "service_unavailable"
    else:
        kind = "server_error"
    message = str(error) if isinstance(error, EngineError) else "Internal server error."
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def check_bind_allowed(settings: ApiSettings) -> None:
    """Refuse to expose an API without a token beyond this machine."""
    if settings.token:
        return
    host = settings.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UserError(
            f"API_HOST={settings.host} would expose the API without a token: "
            "set API_TOKEN to a secret, or listen on 127.0.0.1"
        )


async def serve(
    engine: Engine,
    settings: ApiSettings,
    *,
    engine_settings: EngineSettings | None = None,
    metrics_port: int | None = None,
) -> None:
    """Serve the API until SIGINT/SIGTERM, starting ``engine`` and closing it at the end.

    The port is taken before the engine starts, so a port in use fails at
    once rather than after minutes of model loading; meanwhile ``/healthz``
    says 503 and questions get the engine's "still loading" answer.
    """
    check_bind_allowed(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # A client that hangs up cancels its handler, and with it its place in the
    # engine's queue: nobody waits for an answer no one will read.
    runner = web.AppRunner(
        create_app(engine, settings, engine_settings=engine_settings), handler_cancellation=True
    )
    metrics_server = None
    try:
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.host, settings.port).start()
        except OSError as error:
            raise UserError(
                f"cannot listen on {settings.host}:{settings.port} ({error.strerror}): "
                "choose another API_PORT (or --port)"
            ) from None
        if metrics_port:
            metrics_server = start_metrics_server(metrics_port)
        await engine.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}/v1"
        log.info("serving %s at %s (SIGINT or SIGTERM stops)", ", ".join(model_names()), url)
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        if metrics_server is not None:
            metrics_server.close()
        await engine.close()


def _parse_args(argv: Sequence[str] | None, defaults: ApiSettings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bot api",
        description="Serve the OpenAI-compatible chat API (models 'base' and 'finetuned').",
    )
    parser.add_argument(
        "--host", default=defaults.host, help="address to listen on (API_HOST; default %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=defaults.port,
        help="port to listen on, 0 for any free one (API_PORT; default %(default)s)",
    )
    return parser.parse_args(argv)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bot api``: build the configured engine and serve it over HTTP."""
    settings = ApiSettings.from_env()
    args = _parse_args(argv, settings)
    settings = dataclasses.replace(settings, host=args.host, port=args.port)
    check_bind_allowed(settings)
    engine_settings = EngineSettings.from_env()
    metrics_port = metrics_port_from_env()
    logging.basicConfig(
        level=log_level_from_env(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = build_engine(engine_settings)
    asyncio.run(serve(engine, settings, engine_settings=engine_settings, metrics_port=metrics_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
