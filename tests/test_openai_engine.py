"""OpenAIEngine against a loopback OpenAI-compatible server: the wire format, retries and failures."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from bot.serving.engine import (
    EngineBusy,
    EngineError,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    Message,
    RequestTooLong,
    Sampling,
)
from bot.serving.openai_engine import (
    CUT_OFF,
    UNREACHABLE,
    OpenAIEngine,
    RetryPolicy,
)
from bot.serving.settings import EngineSettings
from finetune.chat import FALLBACK_STOP_STRINGS
from tests.fake_openai import Failure, FakeOpenAIServer
from tests.loopback import free_port
from tests.scripted_engine import scripted_words

pytestmark = pytest.mark.timeout(30)

FAST_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
QUESTION: list[Message] = [{"role": "user", "content": "which wax for spring slush"}]


def settings_for(url: str, **overrides: object) -> EngineSettings:
    values: dict[str, object] = {
        "backend": "openai",
        "openai_base_url": url,
        "base_model_name": "base-model-id",
        "finetuned_model_name": "freeski-lora",
        "request_timeout_s": 10.0,
        "max_new_tokens": 16,
    }
    values.update(overrides)
    return EngineSettings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    settings: EngineSettings, retry: RetryPolicy = FAST_RETRY
) -> AsyncIterator[OpenAIEngine]:
    engine = OpenAIEngine(settings, retry=retry)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as fake:
        yield fake


def expected_text(variant: str, limit: int = 16) -> str:
    return " ".join(scripted_words(QUESTION, variant)[:limit])  # type: ignore[arg-type]


def errors_counted(kind: str) -> float:
    return REGISTRY.get_sample_value("freeski_errors_total", {"kind": kind}) or 0.0


async def test_each_variant_asks_for_its_model_and_streams(server: FakeOpenAIServer) -> None:
    async with running(settings_for(server.url, temperature=0.0)) as engine:
        for variant, model in (("base", "base-model-id"), ("finetuned", "freeski-lora")):
            deltas: list[str] = []
            answer = await engine.generate(QUESTION, variant=variant, on_text=deltas.append)
            assert answer.variant == variant
            assert answer.text == expected_text(variant)
            assert len(deltas) > 1 and "".join(deltas) == answer.text
            assert answer.completion_tokens == len(deltas)  # from the server's usage chunk
            assert answer.prompt_tokens == 7
            assert answer.finish_reason == "stop"
            assert answer.first_token_s is not None and answer.first_token_s <= answer.total_s
            sent = server.requests[-1]
            assert sent["model"] == model
            assert sent["messages"] == QUESTION
            assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
            assert sent["max_tokens"] == 16 and sent["temperature"] == 0.0
            assert "[INST]" in sent["stop"]


async def test_max_new_tokens_is_sent_and_a_cut_answer_says_length(
    server: FakeOpenAIServer,
) -> None:
    async with running(settings_for(server.url)) as engine:
        answer = await engine.generate(QUESTION, variant="base", max_new_tokens=2)
    assert server.requests[-1]["max_tokens"] == 2
    assert answer.text == expected_text("base", 2)
    assert (answer.finish_reason, answer.completion_tokens) == ("length", 2)


async def test_the_conversation_goes_as_given_and_the_api_key_as_bearer() -> None:
    """SYSTEM_PROMPT is the factory's boundary's to add (SystemPrompted), not the backend's."""
    async with (
        FakeOpenAIServer(api_key="sk-local-test") as server,
        running(
            settings_for(
                server.url, system_prompt="Answer briefly.", openai_api_key="sk-local-test"
            )
        ) as engine,
    ):
        await engine.generate(QUESTION)
    assert server.headers[-1]["Authorization"] == "Bearer sk-local-test"
    assert server.requests[-1]["messages"] == QUESTION


def sampling_sent(body: dict[str, object]) -> dict[str, object]:
    names = ("temperature", "top_p", "seed", "stop", "repetition_penalty")
    return {name: body[name] for name in names if name in body}


async def test_a_requests_sampling_goes_to_the_server_and_the_operators_fills_the_rest(
    server: FakeOpenAIServer,
) -> None:
    operator = settings_for(server.url, temperature=0.7, top_p=0.9, repetition_penalty=1.15)
    asked = Sampling(temperature=0.0, top_p=0.5, seed=42, stop=("\n\n",), repetition_penalty=1.3)
    async with running(operator) as engine:
        await engine.generate(QUESTION, sampling=asked)
        await engine.generate(QUESTION, sampling=Sampling(seed=7))
        await engine.generate(QUESTION)
        await engine.compare(QUESTION, sampling=asked)
    fallbacks = list(FALLBACK_STOP_STRINGS)
    own = {
        "temperature": 0.0,
        "top_p": 0.5,
        "seed": 42,
        "stop": ["\n\n", *fallbacks][:4],  # OpenAI takes four: the request's come first
        "repetition_penalty": 1.3,
    }
    operators = {"temperature": 0.7, "top_p": 0.9, "stop": fallbacks, "repetition_penalty": 1.15}
    assert [sampling_sent(body) for body in server.requests] == [
        own,
        {**operators, "seed": 7},
        operators,
        own,
        own,
    ]


async def test_a_wrong_api_key_is_not_retried_and_tells_the_user_to_ask_the_operator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        FakeOpenAIServer(api_key="sk-right") as server,
        running(settings_for(server.url, openai_api_key="sk-wrong")) as engine,
    ):
        with pytest.raises(EngineUnavailable, match="operator"):
            await engine.generate(QUESTION)
    assert len(server.requests) == 1
    assert "OPENAI_API_KEY" in caplog.text
    assert "sk-wrong" not in caplog.text


async def test_server_errors_are_retried_until_answered(server: FakeOpenAIServer) -> None:
    server.script = [Failure(503), Failure(502)]
    before = errors_counted("http_503")
    async with running(settings_for(server.url)) as engine:
        answer = await engine.generate(QUESTION, variant="base")
    assert answer.text == expected_text("base")
    assert len(server.requests) == 3
    assert errors_counted("http_503") == before + 1


async def test_retry_after_is_honoured(server: FakeOpenAIServer) -> None:
    server.script = [Failure(429, retry_after="0.4")]
    async with running(settings_for(server.url)) as engine:
        started = time.monotonic()
        answer = await engine.generate(QUESTION)
        waited = time.monotonic() - started
    assert answer.text == expected_text("finetuned")
    assert waited >= 0.4
    assert len(server.requests) == 2


async def test_still_busy_after_every_retry_is_engine_busy(server: FakeOpenAIServer) -> None:
    server.script = [Failure(429, retry_after="0.05") for _ in range(3)]
    async with running(settings_for(server.url)) as engine:
        with pytest.raises(EngineBusy) as raised:
            await engine.generate(QUESTION)
        assert raised.value.retry_after_s == pytest.approx(0.05)
        assert len(server.requests) == 3
        assert (await engine.generate(QUESTION)).text  # and the engine goes on answering


async def test_a_retry_after_beyond_the_deadline_gives_up_at_once(
    server: FakeOpenAIServer,
) -> None:
    server.script = [Failure(429, retry_after="30")]
    async with running(settings_for(server.url, request_timeout_s=5.0)) as engine:
        started = time.monotonic()
        with pytest.raises(EngineBusy) as raised:
            await engine.generate(QUESTION)
    assert time.monotonic() - started < 2.0
    assert raised.value.retry_after_s == 30
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("status", "error"), [(400, EngineRejected), (504, EngineTimeout), (500, EngineError)]
)
async def test_failures_map_to_engine_errors(
    server: FakeOpenAIServer, status: int, error: type[EngineError]
) -> None:
    server.script = [Failure(status) for _ in range(3)]
    async with running(settings_for(server.url)) as engine:
        with pytest.raises(error) as raised:
            await engine.generate(QUESTION)
    assert type(raised.value) is error
    assert "HTTP" not in str(raised.value) and "127.0.0.1" not in str(raised.value)
    assert len(server.requests) == (1 if status < 500 else 3)  # only server errors are retried


async def test_an_unknown_model_name_points_the_operator_at_the_setting(
    server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(settings_for(server.url, finetuned_model_name="no-such-lora")) as engine:
        with pytest.raises(EngineUnavailable, match="operator"):
            await engine.generate(QUESTION, variant="finetuned")
        assert (await engine.generate(QUESTION, variant="base")).text == expected_text("base")
    assert "FINETUNED_MODEL_NAME" in caplog.text


async def test_server_down_is_unavailable_and_the_engine_recovers_when_it_returns() -> None:
    port = free_port()
    before = errors_counted("connection")
    async with running(settings_for(f"http://127.0.0.1:{port}/v1")) as engine:
        with pytest.raises(EngineUnavailable) as raised:
            await engine.generate(QUESTION)
        assert str(raised.value) == UNREACHABLE  # user-safe: no address, no traceback
        assert errors_counted("connection") == before + FAST_RETRY.attempts
        assert engine.status().ready is False
        async with FakeOpenAIServer(port=port):
            answer = await engine.generate(QUESTION)
        assert answer.text == expected_text("finetuned")
        assert engine.status().ready is True


async def test_a_hanging_server_times_out_at_the_deadline(server: FakeOpenAIServer) -> None:
    server.script = [Failure(hang=True)]
    async with running(settings_for(server.url, request_timeout_s=0.5)) as engine:
        started = time.monotonic()
        with pytest.raises(EngineTimeout):
            await engine.generate(QUESTION)
    assert time.monotonic() - started < 3.0


async def test_a_stream_cut_midway_ends_the_answer_without_repeating_it(
    server: FakeOpenAIServer,
) -> None:
    server.script = [Failure(cut_after_words=2)]
    deltas: list[str] = []
    async with running(settings_for(server.url)) as engine:
        with pytest.raises(EngineUnavailable, match=CUT_OFF):
            await engine.generate(QUESTION, on_text=deltas.append)
    assert "".join(deltas) == expected_text("finetuned", 2)
    assert len(server.requests) == 1  # streamed text is never sent twice


async def test_an_error_event_midway_is_an_engine_error(server: FakeOpenAIServer) -> None:
    server.script = [Failure(error_event_after_words=1)]
    async with running(settings_for(server.url)) as engine:
        with pytest.raises(EngineError, match=CUT_OFF):
            await engine.generate(QUESTION)


async def test_a_chunk_that_is_not_json_is_an_engine_error(server: FakeOpenAIServer) -> None:
    server.script = [Failure(garbage_after_words=1)]
    before = errors_counted("bad_stream")
    async with running(settings_for(server.url)) as engine:
        with pytest.raises(EngineError, match=CUT_OFF):
            await engine.generate(QUESTION)
    assert errors_counted("bad_stream") == before + 1
    assert len(server.requests) == 1


@pytest.mark.parametrize(("penalty", "sent"), [(1.15, 1.15), (1.0, None)])
async def test_repetition_penalty_is_sent_unless_it_is_1(
    server: FakeOpenAIServer, penalty: float, sent: float | None
) -> None:
    async with running(settings_for(server.url, repetition_penalty=penalty)) as engine:
        await engine.generate(QUESTION)
    assert server.requests[-1].get("repetition_penalty") == sent


async def test_an_extension_the_server_refuses_is_dropped_after_the_first_422(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        FakeOpenAIServer(refused_fields=frozenset({"repetition_penalty"})) as server,
        running(settings_for(server.url, repetition_penalty=1.2)) as engine,
    ):
        first = await engine.generate(QUESTION)
        second = await engine.generate(QUESTION, variant="base")
    assert first.text == expected_text("finetuned") and second.text == expected_text("base")
    assert [body.get("repetition_penalty") for body in server.requests] == [1.2, None, None]
    assert caplog.text.count("refuses the sampling extension repetition_penalty") == 1
    assert "OPENAI_SAMPLING_EXTENSIONS" in caplog.text


async def test_no_extension_is_sent_where_the_setting_lists_none() -> None:
    async with (
        FakeOpenAIServer(refused_fields=frozenset({"repetition_penalty"})) as server,
        running(settings_for(server.url, openai_sampling_extensions=())) as engine,
    ):
        await engine.generate(QUESTION)
    assert len(server.requests) == 1 and "repetition_penalty" not in server.requests[0]


async def test_a_4xx_naming_no_extension_is_not_retried(server: FakeOpenAIServer) -> None:
    server.script = [Failure(422)]
    async with running(settings_for(server.url)) as engine:
        with pytest.raises(EngineRejected, match="refused this question"):
            await engine.generate(QUESTION)
    assert len(server.requests) == 1


async def test_a_context_length_refusal_is_request_too_long() -> None:
    async with FakeOpenAIServer() as server:
        server.script = [Failure(400, message="This model's maximum context length is 32 tokens")]
        async with running(settings_for(server.url)) as engine:
            with pytest.raises(RequestTooLong, match="too long"):
                await engine.generate(QUESTION)


async def test_compare_sends_both_variants_at_once() -> None:
    async with (
        FakeOpenAIServer(step_s=0.02) as server,
        running(settings_for(server.url)) as engine,
    ):
        streamed: dict[str, str] = {"base": "", "finetuned": ""}

        def on_text(variant: str, text: str) -> None:
            streamed[variant] += text

        base, finetuned = await engine.compare(QUESTION, on_text=on_text)
    assert (base.variant, finetuned.variant) == ("base", "finetuned")
    assert streamed == {"base": base.text, "finetuned": finetuned.text}
    assert base.text == expected_text("base") and finetuned.text == expected_text("finetuned")
    assert server.max_in_flight == 2


async def test_more_requests_than_the_queue_holds_are_turned_away() -> None:
    async with (
        FakeOpenAIServer(step_s=0.02) as server,
        running(settings_for(server.url, queue_size=2)) as engine,
    ):
        results = await asyncio.gather(
            *(engine.generate(QUESTION) for _ in range(3)), return_exceptions=True
        )
        busy = [r for r in results if isinstance(r, EngineBusy)]
        assert len(busy) == 1 and busy[0].retry_after_s >= 1
        status = engine.status()
    assert len(server.requests) == 2
    assert status.requests_served == 2 and status.queue_depth == 0


async def test_status_before_start_and_after_close(server: FakeOpenAIServer) -> None:
    engine = OpenAIEngine(settings_for(server.url), retry=FAST_RETRY)
    assert engine.status().ready is False
    with pytest.raises(EngineUnavailable):
        await engine.generate(QUESTION)
    await engine.start()
    await engine.start()  # idempotent
    status = engine.status()
    assert (status.backend, status.model, status.adapter) == (
        "openai",
        "base-model-id",
        "freeski-lora",
    )
    assert status.ready is True
    await engine.close()
    await engine.close()
    assert engine.status().ready is False
    assert server.requests == []
