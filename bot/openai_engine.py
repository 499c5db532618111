"""An :class:`~bot.engine.Engine` backed by any OpenAI-compatible chat server.

Scaling past one GPU means moving the model out of the bot's process: vLLM
serves the quantized base with the adapter as a LoRA module, several bots or
replicas share it, and this engine is the bot's end of that wire. Base answers
ask for the server's base model id and finetuned answers for the LoRA's name,
so one server answers both and batches them together, as the local worker does.

The server is another machine that can be busy, restarting or gone. Opening a
request is retried with backoff (honouring ``Retry-After``) while the deadline
allows; once text has streamed to the user a retry would repeat it, so a
failure after that point ends the answer. Every failure reaches the caller as
an :class:`~bot.engine.EngineError` whose message can be shown to the user;
the details an operator needs go to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)
from yarl import URL

from bot import metrics
from bot.engine import (
    VARIANTS,
    Answer,
    EngineBusy,
    EngineError,
    EngineStatus,
    EngineTimeout,
    EngineUnavailable,
    Message,
    OnText,
    Variant,
    stream_for,
)
from bot.settings import EngineSettings
from finetune.chat import FALLBACK_STOP_STRINGS, normalize_conversation

log = logging.getLogger(__name__)

UNREACHABLE = "The answering server can't be reached right now; please try again in a minute."
CUT_OFF = "The answering server stopped in the middle of the answer; please try again."


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try opening a request before telling the user it failed."""

    attempts: int = 4
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    connect_timeout_s: float = 10.0


class _Refused(Exception):
    """The server answered the request with an error status instead of a stream."""

    def __init__(self, status: int, retry_after_s: float | None, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.retry_after_s = retry_after_s
        self.detail = detail

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


def _is_retryable(error: BaseException) -> bool:
    if isinstance(error, _Refused):
        return error.retryable
    return isinstance(error, aiohttp.ClientConnectionError)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def sse_data(stream: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The ``data`` payload of each server-sent event, multi-line data joined."""
    data: list[str] = []
    async for raw in stream:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


@dataclass
class _Stream:
    """What one streamed completion produced."""

    pieces: list[str]
    finish_reason: str | None = None
    first_token_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int | None = None


class OpenAIEngine:
    """Answers through ``POST {OPENAI_BASE_URL}/chat/completions`` with ``stream: true``."""

    backend = "openai"

    def __init__(self, settings: EngineSettings, *, retry: RetryPolicy | None = None) -> None:
        self._settings = settings
        self._retry = retry or RetryPolicy()
        self._url = URL(settings.openai_base_url.rstrip("/") + "/chat/completions")
        self._model_names: dict[Variant, str] = {
            "base": settings.base_model_name,
            "finetuned": settings.finetuned_model_name,
        }
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._reachable: bool | None = None  # unknown until the first request
        self._in_flight = 0
        self._requests_served = 0
        self._tokens_generated = 0
        self._recent_tokens = metrics.RecentRate()
        self._recent_latency_s = 5.0
        self._started_at = time.monotonic()

    async def start(self) -> None:
        if self._session is not None and not self._closed:
            return
        headers = {"Accept": "text/event-stream"}
        if self._settings.openai_api_key:
            headers["Authorization"] = f"Bearer {self._settings.openai_api_key}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            # The overall deadline is the request timeout, enforced around each request;
            # only connecting gets its own, shorter limit so a dead host is retried early.
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._retry.connect_timeout_s, sock_read=None
            ),
            connector=aiohttp.TCPConnector(limit=self._settings.queue_size),
        )
        self._closed = False
        self._started_at = time.monotonic()
        log.info("answering through %s", self._url.with_user(None))

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        variant: Variant = "finetuned",
        max_new_tokens: int | None = None,
        on_text: OnText | None = None,
    ) -> Answer:
        if variant not in self._model_names:
            raise ValueError(f"unknown variant {variant!r}: use one of {VARIANTS}")
        try:
            answer = await self._generate(messages, variant, max_new_tokens, on_text)
        except BaseException as error:
            metrics.ANSWERS.labels(variant, metrics.outcome_of(error)).inc()
            raise
        metrics.ANSWERS.labels(variant, metrics.outcome_of(answer)).inc()
        return answer

    async def compare(
        self,
        messages: Sequence[Message],
        *,
        max_new_tokens: int | None = None,
        on_text: Callable[[Variant, str], None] | None = None,
    ) -> tuple[Answer, Answer]:
        # Both requests go out at once so the server can batch them together.
        tasks = [
            asyncio.ensure_future(
                self.generate(
                    messages,
                    variant=variant,
                    max_new_tokens=max_new_tokens,
                    on_text=stream_for(on_text, variant),
                )
            )
            for variant in VARIANTS
        ]
        try:
            base, finetuned = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return base, finetuned

    def status(self) -> EngineStatus:
        tokens_per_s = self._recent_tokens.per_second()
        return EngineStatus(
            backend=self.backend,
            model=self._model_names["base"],
            adapter=self._model_names["finetuned"],
            device=f"remote {self._url.host}:{self._url.port}",
            ready=self._session is not None and not self._closed and self._reachable is not False,
            queue_depth=self._in_flight,
            queue_size=self._settings.queue_size,
            max_batch=self._settings.max_batch,
            batches_served=0,  # the server batches; it does not say how
            requests_served=self._requests_served,
            tokens_generated=self._tokens_generated,
            tokens_per_s=tokens_per_s,
            uptime_s=time.monotonic() - self._started_at,
        )

    async def _generate(
        self,
        messages: Sequence[Message],
        variant: Variant,
        max_new_tokens: int | None,
        on_text: OnText | None,
    ) -> Answer:
        if self._session is None or self._closed:
            raise EngineUnavailable("The bot is not answering right now (its engine is stopped).")
        if self._in_flight >= self._settings.queue_size:
            metrics.ERRORS.labels("queue_full").inc()
            raise EngineBusy(retry_after_s=max(1.0, self._recent_latency_s))
        limit = self._settings.max_new_tokens  # MAX_NEW_TOKENS caps every answer, as locally
        max_tokens = min(max_new_tokens or limit, limit)
        payload = self._payload(messages, variant, max_tokens)
        timeout_s = self._settings.request_timeout_s
        started = time.monotonic()
        self._in_flight += 1
        metrics.QUEUE_DEPTH.set(self._in_flight)
        try:
            stream = await asyncio.wait_for(
                self._complete(self._session, payload, started, on_text), timeout_s
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
        metrics.GENERATED_TOKENS.labels(variant).inc(completion_tokens)
        metrics.TOKENS_PER_SECOND.set(self._recent_tokens.per_second())
        if stream.first_token_s is not None:
            metrics.FIRST_TOKEN_SECONDS.observe(stream.first_token_s)
        return Answer(
            text="".join(stream.pieces),
            variant=variant,
            finish_reason=_finish_reason(stream.finish_reason, completion_tokens, max_tokens),
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=completion_tokens,
            first_token_s=stream.first_token_s,
            total_s=total_s,
        )

    def _payload(
        self, messages: Sequence[Message], variant: Variant, max_tokens: int
    ) -> dict[str, Any]:
        # Normalized as the local engine does: a peer's template may refuse two user turns.
        chat = normalize_conversation(
            [{"role": m["role"], "content": m["content"]} for m in messages]
        )
        system_prompt = self._settings.system_prompt
        if system_prompt and (not chat or chat[0]["role"] != "system"):
            chat.insert(0, {"role": "system", "content": system_prompt})
        payload: dict[str, Any] = {
            "model": self._model_names[variant],
            "messages": chat,
            "max_tokens": max_tokens,
            "temperature": self._settings.temperature,
            "top_p": self._settings.top_p,
            "stop": list(FALLBACK_STOP_STRINGS),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._settings.repetition_penalty != 1.0:
            # A vLLM extension; REPETITION_PENALTY=1 leaves it out for strict servers.
            payload["repetition_penalty"] = self._settings.repetition_penalty
        return payload

    async def _complete(
        self,
        session: aiohttp.ClientSession,
        payload: dict[str, Any],
        started: float,
        on_text: OnText | None,
    ) -> _Stream:
        try:
            response = await self._open_with_retries(session, payload)
        except _Refused as refused:
            raise self._engine_error(refused, payload["model"]) from None
        except aiohttp.ClientConnectionError as error:
            log.warning("inference server %s unreachable: %s", self._url.with_user(None), error)
            raise EngineUnavailable(UNREACHABLE) from None
        async with response:
            try:
                return await self._read(response, started, on_text)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
                metrics.ERRORS.labels("stream_cut").inc()
                log.warning("stream from %s cut off: %s", self._url.with_user(None), error)
                raise EngineUnavailable(CUT_OFF) from None

    async def _open_with_retries(
        self, session: aiohttp.ClientSession, payload: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        policy = self._retry
        backoff = wait_exponential_jitter(
            initial=policy.initial_backoff_s, max=policy.max_backoff_s
        )

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            hint = getattr(error, "retry_after_s", None)
            return hint if hint is not None else backoff(state)

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.info(
                "retrying %s in %.1f s (attempt %d failed: %s)",
                payload["model"],
                state.upcoming_sleep,
                state.attempt_number,
                error,
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
                return await self._open(session, payload)
        raise AssertionError("unreachable: tenacity either returns or reraises")

    async def _open(
        self, session: aiohttp.ClientSession, payload: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        """One attempt: the response, once the server has accepted the request."""
        try:
            response = await session.post(self._url, json=payload)
        except aiohttp.ClientConnectionError:
            self._reachable = False
            metrics.ERRORS.labels("connection").inc()
            raise
        self._reachable = True
        if response.status == 200:
            return response
        async with response:
            body = await response.text()
        metrics.ERRORS.labels(f"http_{response.status}").inc()
        raise _Refused(
            response.status,
            parse_retry_after(response.headers.get("Retry-After")),
            _error_detail(body),
        )

    async def _read(
        self, response: aiohttp.ClientResponse, started: float, on_text: OnText | None
    ) -> _Stream:
        stream = _Stream(pieces=[])
        done = False
        async for data in sse_data(response.content):
            if data.strip() == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                metrics.ERRORS.labels("bad_stream").inc()
                log.warning("inference server sent a chunk that is not JSON: %.200s", data)
                raise EngineError(CUT_OFF) from None
            if "error" in chunk:
                metrics.ERRORS.labels("stream_error").inc()
                log.warning("inference server failed mid-answer: %s", chunk["error"])
                raise EngineError(CUT_OFF)
            if usage := chunk.get("usage"):
                stream.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                stream.completion_tokens = int(usage.get("completion_tokens") or 0)
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if stream.first_token_s is None:
                        stream.first_token_s = time.monotonic() - started
                    stream.pieces.append(text)
                    if on_text is not None:
                        on_text(text)
                if choice.get("finish_reason"):
                    stream.finish_reason = choice["finish_reason"]
        if not done and stream.finish_reason is None:
            metrics.ERRORS.labels("stream_cut").inc()
            raise EngineUnavailable(CUT_OFF)
        return stream

    def _engine_error(self, refused: _Refused, model: str) -> EngineError:
        """The user-facing error for a request the server would not take."""
        status = refused.status
        where = self._url.with_user(None)
        if status == 429:
            return EngineBusy(retry_after_s=refused.retry_after_s or self._retry.max_backoff_s)
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
                refused.detail,
            )
            return EngineUnavailable(
                "The answering server does not serve this model; tell the bot's operator."
            )
        if status in (502, 503):
            log.warning("%s is unavailable (HTTP %d): %s", where, status, refused.detail)
            return EngineUnavailable(UNREACHABLE)
        log.warning("%s failed the request (HTTP %d): %s", where, status, refused.detail)
        if status >= 500:
            return EngineError("The answering server failed on this question; please try again.")
        return EngineError(
            "The answering server could not take this question (it may be too long)."
        )


def _error_detail(body: str) -> str:
    """The server's own error message, for the log."""
    try:
        error = json.loads(body).get("error")
    except (json.JSONDecodeError, AttributeError):
        return body[:200]
    if isinstance(error, dict):
        return str(error.get("message", error))[:200]
    return str(error)[:200]


def _finish_reason(
    reported: str | None, completion_tokens: int, max_tokens: int
) -> Literal["stop", "length", "cancelled"]:
    if reported in ("stop", "length"):
        return reported
    if reported == "abort":
        return "cancelled"
    return "length" if completion_tokens >= max_tokens else "stop"
