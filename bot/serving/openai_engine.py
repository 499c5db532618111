"""An :class:`~bot.serving.engine.Engine` backed by any OpenAI-compatible chat server.

Scaling past one GPU means moving the model out of the bot's process: vLLM
serves the quantized base with the adapter as a LoRA module, several bots or
replicas share it, and this engine is the bot's end of that wire. Base answers
ask for the server's base model id and finetuned answers for the LoRA's name,
so one server answers both and batches them together, as the local worker does.

The wire itself (requests, server-sent events, error statuses) is the official
``openai`` client's. What the client cannot know is ours: the request's
deadline (``REQUEST_TIMEOUT_S``, queue included) and what a failure means to a
Discord user. So the client's own retries are off, and opening a request is
retried here, with backoff honouring ``Retry-After``, on 429, 5xx and refused
connections, while the deadline allows. Once text has streamed to the user a
retry would repeat it, so a failure after that point ends the answer. Every
failure reaches the caller as an :class:`~bot.serving.engine.EngineError` whose
message can be shown to the user; the details an operator needs go to the log.

Each request samples as its caller asked (:class:`~bot.serving.engine.Sampling`):
``temperature``, ``top_p``, ``seed`` and ``stop`` are OpenAI's own fields and
go to the server as sent, the operator's settings filling what was left out.
A request's ``stop`` strings come first; the template markers of
:data:`~finetune.chat.FALLBACK_STOP_STRINGS` fill the rest of OpenAI's four.

Servers differ in what they accept beyond OpenAI's fields: vLLM takes
``repetition_penalty``, OpenAI and ``transformers serve`` refuse the request
(422 "Unexpected fields"). The engine sends the extensions
``OPENAI_SAMPLING_EXTENSIONS`` names, and when a server's 4xx names one it
sent, it drops that one for good and sends the request again without it, so a
forgotten setting costs one refused request, never every answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionChunk
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from bot.serving import metrics
from bot.serving.adapters import BASE, FINETUNED, ServedAdapter, ServedModels
from bot.serving.engine import (
    MAX_STOP_STRINGS,
    VARIANTS,
    Answer,
    EngineBusy,
    EngineError,
    EngineRejected,
    EngineStatus,
    EngineTimeout,
    EngineUnavailable,
    FinishReason,
    Message,
    OnText,
    RequestTooLong,
    RuntimeUpdatesUnsupported,
    Sampling,
    UnknownModel,
    Variant,
    check_pair,
    stream_for,
)
from bot.serving.settings import EngineSettings
from finetune.chat import FALLBACK_STOP_STRINGS, normalize_conversation
from freeski_common.http import parse_retry_after

log = logging.getLogger(__name__)

UNREACHABLE = "The answering server can't be reached right now; please try again in a minute."
CUT_OFF = "The answering server stopped in the middle of the answer; please try again."
REJECTED = (
    "The answering server refused this question as it was sent; "
    "the bot's operator can see why in the bot's log."
)
TOO_LONG = "This conversation is too long for the answering server; please ask a shorter question."
# What servers say when prompt plus max_tokens exceed the context (vLLM, OpenAI).
CONTEXT_LENGTH_HINTS = ("maximum context length", "context_length_exceeded", "context length")
# The client insists on a key; servers started without one (vLLM's default) ignore it.
NO_KEY = "EMPTY"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try opening a request before telling the user it failed."""

    attempts: int = 4
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    connect_timeout_s: float = 10.0


def _is_retryable(error: BaseException) -> bool:
    if isinstance(error, openai.APIStatusError):
        return error.status_code == 429 or error.status_code >= 500
    return isinstance(error, openai.APIConnectionError)  # refused, reset, connect timeout


def _retry_after_s(error: BaseException | None) -> float | None:
    if isinstance(error, openai.APIStatusError):
        return parse_retry_after(error.response.headers.get("Retry-After"))
    return None


@dataclass
class _Stream:
    """What one streamed completion produced."""

    pieces: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int | None = None


_REMOTE_ADAPTERS = (
    "this bot answers through an OpenAI-compatible server (INFERENCE_BACKEND=openai), whose "
    "adapters are that server's to load: load it there (vLLM: POST /v1/load_lora_adapter)"
)


class OpenAIEngine:
    """Answers through ``POST {OPENAI_BASE_URL}/chat/completions`` with ``stream: true``."""

    backend = "openai"

    def __init__(self, settings: EngineSettings, *, retry: RetryPolicy | None = None) -> None:
        self._settings = settings
        self._retry = retry or RetryPolicy()
        self._where = _without_credentials(settings.openai_base_url)
        # Our names → the server's: BASE_MODEL_NAME and FINETUNED_MODEL_NAME, or with ADAPTERS
        # each adapter's own name (vLLM's --lora-modules name=path), "finetuned" the default's.
        self._model_names: dict[Variant, str] = {BASE: settings.base_model_name}
        for spec in settings.adapters:
            self._model_names[spec.name] = spec.name
        default = settings.default_adapter_name if settings.adapters else None
        self._model_names[FINETUNED] = default or settings.finetuned_model_name
        # Shrinks when the server refuses one of them (see _refused_extension).
        self._extensions = set(settings.openai_sampling_extensions)
        self._client: AsyncOpenAI | None = None
        self._closed = False
        self._reachable: bool | None = None  # unknown until the first request
        self._in_flight = 0
        self._requests_served = 0
        self._tokens_generated = 0
        self._recent_tokens = metrics.RecentRate()
        self._recent_latency_s = 5.0
        self._started_at = time.monotonic()

    async def start(self) -> None:
        if self._client is not None and not self._closed:
            return
        # The client logs every request at INFO; the bot's log is for what an operator acts on.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        self._client = AsyncOpenAI(
            base_url=self._settings.openai_base_url,
            api_key=self._settings.openai_api_key or NO_KEY,
            max_retries=0,  # ours below know the request's deadline
            # The overall deadline is the request timeout, enforced around each request;
            # only connecting gets its own, shorter limit so a dead host is retried early.
            timeout=openai.Timeout(None, connect=self._retry.connect_timeout_s),
        )
        self._closed = False
        self._started_at = time.monotonic()
        log.info("answering through %s/chat/completions", self._where)

    async def close(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        variant: Variant = FINETUNED,
        max_new_tokens: int | None = None,
        on_text: OnText | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,  # grounding happens above the backend (GroundedEngine)
    ) -> Answer:
        if variant not in self._model_names:
            raise UnknownModel(
                f"no model is served as {variant!r}: ask one of {', '.join(self._model_names)}"
            )
        return await self._generate(messages, variant, max_new_tokens, on_text, sampling)

    async def compare(
        self,
        messages: Sequence[Message],
        *,
        models: tuple[Variant, Variant] = VARIANTS,
        max_new_tokens: int | None = None,
        on_text: Callable[[Variant, str], None] | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,
    ) -> tuple[Answer, Answer]:
        check_pair(models)
        # Both requests go out at once so the server can batch them together.
        tasks = [
            asyncio.ensure_future(
                self.generate(
                    messages,
                    variant=variant,
                    max_new_tokens=max_new_tokens,
                    on_text=stream_for(on_text, variant),
                    sampling=sampling,
                )
            )
            for variant in models
        ]
        try:
            first, second = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return first, second

    def models(self) -> ServedModels:
        """The server's adapters under their names here; their weights are the server's."""
        names = [n for n in self._model_names if n not in VARIANTS]
        if not names and self._model_names[FINETUNED]:
            return ServedModels(
                (ServedAdapter(FINETUNED, self._model_names[FINETUNED]),), FINETUNED
            )
        paths = {spec.name: str(spec.path) for spec in self._settings.adapters}
        adapters = tuple(ServedAdapter(n, paths.get(n, n)) for n in names)
        return ServedModels(adapters, self._model_names[FINETUNED])

    async def load_adapter(self, name: str, path: str | os.PathLike[str]) -> ServedAdapter:
        raise RuntimeUpdatesUnsupported(_REMOTE_ADAPTERS)

    async def unload_adapter(self, name: str) -> None:
        raise RuntimeUpdatesUnsupported(_REMOTE_ADAPTERS)

    async def set_default(self, name: str) -> ServedModels:
        raise RuntimeUpdatesUnsupported(_REMOTE_ADAPTERS)

    def status(self) -> EngineStatus:
        parts = urlsplit(self._settings.openai_base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return EngineStatus(
            backend=self.backend,
            model=self._model_names["base"],
            adapter=self._model_names["finetuned"],
            device=f"remote {parts.hostname}:{port}",
            ready=self._client is not None and not self._closed and self._reachable is not False,
            queue_depth=self._in_flight,
            queue_size=self._settings.queue_size,
            max_batch=self._settings.max_batch,
            batches_served=0,  # the server batches; it does not say how
            requests_served=self._requests_served,
            tokens_generated=self._tokens_generated,
            tokens_per_s=self._recent_tokens.per_second(),
            uptime_s=time.monotonic() - self._started_at,
        )

    async def _generate(
        self,
        messages: Sequence[Message],
        variant: Variant,
        max_new_tokens: int | None,
        on_text: OnText | None,
        sampling: Sampling | None,
    ) -> Answer:
        if self._client is None or self._closed:
            raise EngineUnavailable("The bot is not answering right now (its engine is stopped).")
        if self._in_flight >= self._settings.queue_size:
            metrics.ERRORS.labels("queue_full").inc()
            raise EngineBusy(retry_after_s=max(1.0, self._recent_latency_s))
        limit = self._settings.max_new_tokens  # MAX_NEW_TOKENS caps every answer, as locally
        max_tokens = min(max_new_tokens or limit, limit)
        request = self._request(messages, variant, max_tokens, sampling or Sampling())
        timeout_s = self._settings.request_timeout_s
        started = time.monotonic()
        self._in_flight += 1
        metrics.QUEUE_DEPTH.set(self._in_flight)
        try:
            stream = await asyncio.wait_for(
                self._complete(self._client, request, started, on_text), timeout_s
            )
        except asyncio.TimeoutError:
            metrics.ERRORS.labels("timeout").inc()
            raise EngineTimeout(
                f"No answer within {timeout_s:.0f} s; please try again later."
            ) from None
        finally:
            self._in_flight -= 1
            metrics.QUEUE_DEPTH.set(self._in_flight)
        total_s = time.monotonic() - started
        completion_tokens = (
            stream.completion_tokens
            if stream.completion_tokens is not None
            else len(stream.pieces)  # no usage sent: one chunk is about one token
        )
        self._requests_served += 1
        self._tokens_generated += completion_tokens
        self._recent_tokens.add(completion_tokens)
        self._recent_latency_s = 0.8 * self._recent_latency_s + 0.2 * total_s
        return Answer(
            text="".join(stream.pieces),
            variant=variant,
            finish_reason=_finish_reason(stream.finish_reason, completion_tokens, max_tokens),
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=completion_tokens,
            first_token_s=stream.first_token_s,
            total_s=total_s,
        )

    def _request(
        self, messages: Sequence[Message], variant: Variant, max_tokens: int, sampling: Sampling
    ) -> dict[str, Any]:
        """The keyword arguments of ``chat.completions.create`` for one answer."""
        # Normalized as the local engine does: a peer's template may refuse two user turns.
        chat = normalize_conversation(
            [{"role": m["role"], "content": m["content"]} for m in messages]
        )
        operator = self._settings
        request: dict[str, Any] = {
            "model": self._model_names[variant],
            "messages": chat,
            "max_tokens": max_tokens,
            "temperature": _or(sampling.temperature, operator.temperature),
            "top_p": _or(sampling.top_p, operator.top_p),
            "stop": _stop_strings(sampling.stop),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if sampling.seed is not None:
            request["seed"] = sampling.seed
        extensions = self._sampling_extensions(sampling)
        if extensions:
            request["extra_body"] = extensions
        return request

    def _sampling_extensions(self, sampling: Sampling) -> dict[str, Any]:
        """The non-OpenAI sampling fields this server takes, where they change anything."""
        wanted = {
            "repetition_penalty": _or(
                sampling.repetition_penalty, self._settings.repetition_penalty
            )
        }
        neutral = {"repetition_penalty": 1.0}
        return {
            name: value
            for name, value in wanted.items()
            if name in self._extensions and value != neutral[name]
        }

    def _refused_extension(self, refused: openai.APIStatusError, request: dict[str, Any]) -> bool:
        """Drop the extension a 4xx names (e.g. 422 "Unexpected fields: {'repetition_penalty'}").

        True when one was dropped and the request, rebuilt without it, is worth sending again.
        """
        sent = request.get("extra_body") or {}
        if not sent or not 400 <= refused.status_code < 500 or refused.status_code == 429:
            return False
        said = f"{refused.message} {refused.body}"
        named = [name for name in sent if name in said]
        if not named:
            return False
        for name in named:
            self._extensions.discard(name)
            log.warning(
                "%s refuses the sampling extension %s (%s): no longer sending it; set "
                "OPENAI_SAMPLING_EXTENSIONS to what this server takes ('none' for none)",
                self._where,
                name,
                _describe(refused),
            )
        request["extra_body"] = {k: v for k, v in sent.items() if k not in named}
        if not request["extra_body"]:
            del request["extra_body"]
        return True

    async def _complete(
        self,
        client: AsyncOpenAI,
        request: dict[str, Any],
        started: float,
        on_text: OnText | None,
    ) -> _Stream:
        try:
            try:
                chunks = await self._open_with_retries(client, request)
            except openai.APIStatusError as refused:
                if not self._refused_extension(refused, request):
                    raise
                chunks = await self._open_with_retries(client, request)
        except openai.APIStatusError as refused:
            raise self._engine_error(refused, request["model"]) from None
        except openai.APIConnectionError as error:
            log.warning("inference server %s unreachable: %s", self._where, error)
            raise EngineUnavailable(UNREACHABLE) from None
        async with chunks:
            try:
                return await self._read(chunks, started, on_text)
            except openai.APIConnectionError as error:  # the connection broke mid-stream
                metrics.ERRORS.labels("stream_cut").inc()
                log.warning("stream from %s cut off: %s", self._where, error)
                raise EngineUnavailable(CUT_OFF) from None
            except openai.APIError as error:  # an error event in the stream
                metrics.ERRORS.labels("stream_error").inc()
                log.warning("inference server failed mid-answer: %s", error.message)
                raise EngineError(CUT_OFF) from None
            except ValueError as error:  # a chunk that is not JSON
                metrics.ERRORS.labels("bad_stream").inc()
                log.warning("inference server sent a chunk that is not JSON: %s", error)
                raise EngineError(CUT_OFF) from None

    async def _open_with_retries(
        self, client: AsyncOpenAI, request: dict[str, Any]
    ) -> AsyncStream[ChatCompletionChunk]:
        policy = self._retry
        backoff = wait_exponential_jitter(
            initial=policy.initial_backoff_s, max=policy.max_backoff_s
        )

        def wait(state: RetryCallState) -> float:
            hint = _retry_after_s(state.outcome.exception() if state.outcome else None)
            return hint if hint is not None else backoff(state)

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.info(
                "retrying %s in %.1f s (attempt %d failed: %s)",
                request["model"],
                state.upcoming_sleep,
                state.attempt_number,
                _describe(error),
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            wait=wait,
            # Give up early rather than sleep past the request's deadline.
            stop=stop_after_attempt(policy.attempts)
            | stop_before_delay(self._settings.request_timeout_s),
            before_sleep=log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._open(client, request)
        raise AssertionError("unreachable: tenacity either returns or reraises")

    async def _open(
        self, client: AsyncOpenAI, request: dict[str, Any]
    ) -> AsyncStream[ChatCompletionChunk]:
        """One attempt: the stream, once the server has accepted the request."""
        try:
            chunks: AsyncStream[ChatCompletionChunk] = await client.chat.completions.create(
                **request
            )
        except openai.APIStatusError as error:
            self._reachable = True
            metrics.ERRORS.labels(f"http_{error.status_code}").inc()
            raise
        except openai.APIConnectionError:
            self._reachable = False
            metrics.ERRORS.labels("connection").inc()
            raise
        self._reachable = True
        return chunks

    async def _read(
        self, chunks: AsyncStream[ChatCompletionChunk], started: float, on_text: OnText | None
    ) -> _Stream:
        stream = _Stream()
        async for chunk in chunks:
            if chunk.usage is not None:
                stream.prompt_tokens = chunk.usage.prompt_tokens or 0
                stream.completion_tokens = chunk.usage.completion_tokens or 0
            for choice in chunk.choices or ():
                text = choice.delta.content if choice.delta is not None else None
                if text:
                    if stream.first_token_s is None:
                        stream.first_token_s = time.monotonic() - started
                    stream.pieces.append(text)
                    if on_text is not None:
                        on_text(text)
                if choice.finish_reason:
                    stream.finish_reason = choice.finish_reason
        if stream.finish_reason is None:  # the body ended without saying how the answer did
            metrics.ERRORS.labels("stream_cut").inc()
            raise EngineUnavailable(CUT_OFF)
        return stream

    def _engine_error(self, refused: openai.APIStatusError, model: str) -> EngineError:
        """The user-facing error for a request the server would not take."""
        status, detail, where = refused.status_code, _describe(refused), self._where
        if status == 429:
            retry_after_s = _retry_after_s(refused)
            return EngineBusy(
                retry_after_s=retry_after_s
                if retry_after_s is not None
                else self._retry.max_backoff_s
            )
        if status == 504:
            return EngineTimeout("The answering server took too long; please try again later.")
        if status in (401, 403):
            log.error("%s refused the API key (HTTP %d): check OPENAI_API_KEY", where, status)
            return EngineUnavailable(
                "The answering server refused the bot's credentials; tell the bot's operator."
            )
        if status == 404:
            log.error(
                "%s has no model %r (%s): check BASE_MODEL_NAME / FINETUNED_MODEL_NAME",
                where,
                model,
                detail,
            )
            return EngineUnavailable(
                "The answering server does not serve this model; tell the bot's operator."
            )
        if status in (502, 503):
            log.warning("%s is unavailable (HTTP %d): %s", where, status, detail)
            return EngineUnavailable(UNREACHABLE)
        log.warning("%s failed the request (HTTP %d): %s", where, status, detail)
        if status >= 500:
            return EngineError("The answering server failed on this question; please try again.")
        if any(hint in detail.lower() for hint in CONTEXT_LENGTH_HINTS):
            return RequestTooLong(TOO_LONG)
        return EngineRejected(REJECTED)


def _describe(error: BaseException | None) -> str:
    """The server's own error message (or the failure), short enough for a log line."""
    if isinstance(error, openai.APIStatusError):
        body = error.body
        message = body.get("message", body) if isinstance(body, dict) else body
        return f"HTTP {error.status_code}: {str(message or error.message)[:200]}"
    return str(error)[:200]


def _without_credentials(url: str) -> str:
    """``url`` for the log: no ``user:password@``, no trailing slash."""
    parts = urlsplit(url.rstrip("/"))
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _or(asked: float | None, operator: float) -> float:
    """The request's own value, else the operator's."""
    return operator if asked is None else asked


def _stop_strings(asked: Sequence[str]) -> list[str]:
    """The request's stop strings, then the template markers, at most OpenAI's four."""
    stop = list(dict.fromkeys([*asked, *FALLBACK_STOP_STRINGS]))
    return stop[:MAX_STOP_STRINGS]


def _finish_reason(reported: str | None, completion_tokens: int, max_tokens: int) -> FinishReason:
    if reported in ("stop", "length"):
        return reported  # type: ignore[return-value]
    if reported == "abort":
        return "cancelled"
    return "length" if completion_tokens >= max_tokens else "stop"
