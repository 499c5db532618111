"""The HTTP routes of the OpenAI-compatible API, over any running engine."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from bot.api.access import bearer_auth, public_status, same_origin_only
from bot.api.adapters import AdapterRoutes
from bot.api.feedback import ApiFeedback, FeedbackRoute
from bot.api.protocol import (
    ApiError,
    ChatRequest,
    ChunkStream,
    completion_body,
    decode_json_body,
    error_body,
    model_names,
    models_body,
    parse_chat_request,
)
from bot.api.settings import ApiSettings
from bot.api.webchat import add_webchat_routes
from bot.serving.engine import (
    Answer,
    Engine,
    EngineBusy,
    EngineError,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    Message,
    RequestTooLong,
    UnknownModel,
    Variant,
)
from bot.serving.ratelimit import RateLimiter
from bot.serving.settings import EngineSettings

log = logging.getLogger(__name__)


# Told of every finished answer: completion id, the messages answered, the answer, max_tokens.
OnAnswer = Callable[[str, Sequence[Message], Answer, int | None], None]


class ChatApi:
    """The routes, bound to one engine and one set of limits."""

    def __init__(
        self,
        engine: Engine,
        settings: ApiSettings,
        engine_settings: EngineSettings | None = None,
        on_answer: OnAnswer | None = None,
    ) -> None:
        self._engine = engine
        self._on_answer = on_answer
        self._settings = settings
        self._engine_settings = engine_settings
        self._created = int(time.time())
        self._rate_limit = RateLimiter(settings.rate_limit_per_minute)

    def _within_rate_limit(self, request: web.Request) -> None:
        """``API_RATE_LIMIT_PER_MINUTE`` per client, beside the queue's bound: one client
        cannot fill the queue for everyone. A client is its token when the server
        requires one (checked already, so a client cannot invent new ones), else its address."""
        client = request.headers.get("Authorization") if self._settings.token else request.remote
        wait_s = self._rate_limit.acquire(client or "unknown")
        if wait_s is not None:
            raise ApiError.too_many(
                f"Too many requests from this client: at most "
                f"{self._settings.rate_limit_per_minute} a minute (API_RATE_LIMIT_PER_MINUTE).",
                code="rate_limit_exceeded",
                wait_s=wait_s,
            )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._within_rate_limit(request)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(
                413,
                f"The request body is larger than this server's {self._settings.max_request_bytes} bytes.",
                code="request_too_large",
            ) from None
        chat = parse_chat_request(
            decode_json_body(raw),
            models=self._models(),
            max_tokens_cap=self._settings.max_tokens_cap,
            max_messages=self._settings.max_messages,
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return await self._stream(request, chat, completion_id)
        answer = await self._engine.generate(
            chat.messages,
            variant=chat.variant,
            max_new_tokens=chat.max_tokens,
            sampling=chat.sampling,
            grounding=chat.grounding,
        )
        self._answered(completion_id, chat, answer)
        return web.json_response(completion_body(completion_id, chat.model, answer))

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
                sampling=chat.sampling,
                grounding=chat.grounding,
            )
        )
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        chunks = ChunkStream(completion_id, chat.model)

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
                await _send(response, chunks.first())
                while piece is not None:
                    await _send(response, chunks.text(piece))
                    piece = await pieces.get()
                try:
                    answer = task.result()
                except Exception as error:
                    # Too late for a status code: say it in the stream, as vLLM does.
                    if not isinstance(error, EngineError):
                        log.error("answer %s failed", completion_id, exc_info=error)
                    await _send(response, _error_event(error))
                else:
                    self._answered(completion_id, chat, answer)  # before a vote can follow
                    await _send(response, chunks.finish(answer.finish_reason, answer))
                    if chat.include_usage:
                        await _send(response, chunks.usage(answer))
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
            except ConnectionResetError:
                log.debug("client left before %s finished", completion_id)
            return response
        finally:
            if not task.done():  # the client went away: free the engine's slot
                task.cancel()

    def _answered(self, completion_id: str, chat: ChatRequest, answer: Answer) -> None:
        if self._on_answer is not None:
            self._on_answer(completion_id, chat.messages, answer, chat.max_tokens)

    def _models(self) -> dict[str, Variant]:
        """The names answered now: asked of the engine each time, as adapters come and go."""
        return model_names(self._engine.models(), self._engine_settings)

    async def models(self, request: web.Request) -> web.Response:
        served = self._engine.models()
        names = model_names(served, self._engine_settings)
        return web.json_response(models_body(served, names, self._created))

    async def healthz(self, request: web.Request) -> web.Response:
        """200 only while the engine is loaded and its loop goes round (its heartbeat)."""
        status = self._engine.status()
        state = "unavailable" if not status.ready else status.worker
        return web.json_response(
            {
                "status": state,
                "engine": dataclasses.asdict(public_status(status)),
            },
            status=200 if state == "ok" else 503,
        )


def create_app(
    engine: Engine,
    settings: ApiSettings,
    *,
    engine_settings: EngineSettings | None = None,
    feedback: ApiFeedback | None = None,
) -> web.Application:
    """The API over an engine someone else starts and closes (the bot, or :func:`serve`).

    With ``feedback``, answers are recorded and ``POST /v1/feedback`` takes votes on them.
    """
    api = ChatApi(engine, settings, engine_settings, feedback.record if feedback else None)
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        middlewares=[
            _openai_errors,
            same_origin_only(settings.token, settings.host, settings.allowed_hosts),
            bearer_auth(settings.token),
        ],
    )
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/healthz", api.healthz)
    AdapterRoutes(
        engine,
        enabled=settings.runtime_adapter_updates,
        leaderboard=feedback.store.leaderboard if feedback else None,
    ).install(app)
    FeedbackRoute(feedback, settings).install(app)
    add_webchat_routes(app, feedback=feedback is not None)
    return app


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OpenAI-style JSON error, which is what clients parse."""
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except EngineBusy as error:
        return ApiError.too_many(str(error), code="busy", wait_s=error.retry_after_s).response()
    except EngineTimeout as error:
        return ApiError(504, str(error), type="timeout", code="timeout").response()
    except EngineUnavailable as error:
        return ApiError(503, str(error), type="service_unavailable").response()
    except RequestTooLong as error:  # the asker's to shorten, as OpenAI says of a long context
        return ApiError(400, str(error), code="context_length_exceeded").response()
    except EngineRejected as error:  # the inference server's 4xx, passed on as one
        return ApiError(400, str(error), code="rejected_by_backend").response()
    except UnknownModel as error:  # vLLM's answer to a name not served (or just unloaded)
        return ApiError(404, str(error), code="model_not_found").response()
    except InvalidRequest as error:  # the asker's to fix; refused adapter changes too
        return ApiError(400, str(error)).response()
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


async def _send(response: web.StreamResponse, event: Mapping[str, Any]) -> None:
    await response.write(f"data: {json.dumps(event)}\n\n".encode())


def _error_event(error: Exception) -> dict[str, Any]:
    if isinstance(error, EngineTimeout):
        kind = "timeout"
    elif isinstance(error, EngineUnavailable):
        kind = "service_unavailable"
    elif isinstance(error, RequestTooLong | InvalidRequest):
        kind = "invalid_request_error"
    else:
        kind = "server_error"
    message = str(error) if isinstance(error, EngineError) else "Internal server error."
    return error_body(message, type=kind)
