"""The OpenAI-compatible HTTP API over a scripted engine, on loopback, with plain aiohttp as the client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.api.routes import create_app
from bot.api.server import check_bind_allowed, main
from bot.api.settings import ApiSettings
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
from bot.serving.openai_engine import OpenAIEngine, RetryPolicy
from bot.serving.settings import EngineSettings
from freeski_common.errors import UserError
from tests.loopback import bot_api, serve_app
from tests.scripted_engine import ScriptedEngine, scripted_words

pytestmark = pytest.mark.timeout(30)

QUESTION: list[Message] = [{"role": "user", "content": "are twin tips good for park"}]
ALIASES = EngineSettings(
    backend="openai", base_model_name="base-model-id", finetuned_model_name="freeski-lora"
)


@contextlib.asynccontextmanager
async def api_over(
    engine: ScriptedEngine, settings: ApiSettings | None = None
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """The API on a free loopback port, and a client session for it."""
    await engine.start()
    app = create_app(engine, settings or ApiSettings(), engine_settings=ALIASES)
    async with serve_app(app) as url, aiohttp.ClientSession(url) as client:
        yield url, client


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


def chat(model: str = "finetuned", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": QUESTION, **extra}


def expected(variant: str, limit: int = 64) -> str:
    return " ".join(scripted_words(QUESTION, variant)[:limit])  # type: ignore[arg-type]


async def read_events(response: aiohttp.ClientResponse) -> list[Any]:
    """Every ``data:`` payload of an event stream: parsed JSON, or the literal ``[DONE]``."""
    events: list[Any] = []
    async for line in response.content:
        text = line.decode().strip()
        if text.startswith("data: "):
            payload = text.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.mark.parametrize(
    ("model", "variant"),
    [
        ("base", "base"),
        ("finetuned", "finetuned"),
        ("base-model-id", "base"),
        ("freeski-lora", "finetuned"),
    ],
)
async def test_chat_completion_answers_with_the_requested_variant(
    engine: ScriptedEngine, model: str, variant: str
) -> None:
    async with api_over(engine) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat(model, max_tokens=5))
        body = await response.json()
    assert response.status == 200
    assert body["object"] == "chat.completion" and body["model"] == model
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected(variant, 5)}
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == 5 + body["usage"]["prompt_tokens"]
    assert engine.requests == [(variant, QUESTION, 5)]


async def test_streaming_sends_role_content_finish_usage_then_done(engine: ScriptedEngine) -> None:
    async with api_over(engine) as (_, client):
        request = chat("base", stream=True, stream_options={"include_usage": True})
        async with client.post("/v1/chat/completions", json=request) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            events = await read_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "base" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected("base")
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(expected("base").split())


async def test_models_lists_both_variants_and_the_configured_names(engine: ScriptedEngine) -> None:
    async with api_over(engine) as (_, client):
        body = await (await client.get("/v1/models")).json()
    roots = {model["id"]: model["root"] for model in body["data"]}
    assert body["object"] == "list"
    assert roots["base"] == roots["base-model-id"] == "base"
    assert roots["finetuned"] == roots["freeski-lora"] == "finetuned"


async def test_healthz_reports_the_engine(engine: ScriptedEngine) -> None:
    async with api_over(engine) as (_, client):
        ok = await client.get("/healthz")
        assert ok.status == 200
        assert (await ok.json())["engine"]["backend"] == "scripted"
        engine.ready = False
        down = await client.get("/healthz")
        assert down.status == 503 and (await down.json())["status"] == "unavailable"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"messages": QUESTION}).encode(), 400, "model"),
        (json.dumps(chat("gpt-4")).encode(), 404, "model"),
        (json.dumps({"model": "base", "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": "base", "messages": ["hi"]}).encode(), 400, "messages[0]"),
        (
            json.dumps({"model": "base", "messages": [{"role": "tool", "content": "x"}]}).encode(),
            400,
            "messages[0].role",
        ),
        (
            json.dumps({"model": "base", "messages": [{"role": "user", "content": 5}]}).encode(),
            400,
            "messages[0].content",
        ),
        (json.dumps(chat(max_tokens="10")).encode(), 400, "max_tokens"),
        (json.dumps(chat(max_tokens=0)).encode(), 400, "max_tokens"),
        (json.dumps(chat(max_tokens=100_000)).encode(), 400, "max_tokens"),
        (json.dumps(chat(n=2)).encode(), 400, "n"),
        (json.dumps(chat(stream="yes")).encode(), 400, "stream"),
        # The ranges OpenAI documents for the sampling fields.
        (json.dumps(chat(temperature=5)).encode(), 400, "temperature"),
        (json.dumps(chat(temperature=-0.1)).encode(), 400, "temperature"),
        (json.dumps(chat(temperature="0.7")).encode(), 400, "temperature"),
        (json.dumps(chat(top_p=1.5)).encode(), 400, "top_p"),
        (json.dumps(chat(top_p=0)).encode(), 400, "top_p"),
        (json.dumps(chat(seed=2**64)).encode(), 400, "seed"),
        (json.dumps(chat(repetition_penalty=0)).encode(), 400, "repetition_penalty"),
        # No engine has these: only OpenAI's default, 0, is taken.
        (json.dumps(chat(presence_penalty=0.5)).encode(), 400, "presence_penalty"),
        (json.dumps(chat(frequency_penalty=-3)).encode(), 400, "frequency_penalty"),
        (json.dumps(chat(stop=["a", "b", "c", "d", "e"])).encode(), 400, "stop"),
        (json.dumps(chat(max_completion_tokens=0)).encode(), 400, "max_completion_tokens"),
        (json.dumps(chat(stream=True, stream_options=[])).encode(), 400, "stream_options"),
        (
            json.dumps(
                {"model": "base", "messages": [{"role": "user", "content": [{"type": "image"}]}]}
            ).encode(),
            400,
            "messages[0].content",
        ),
    ],
)
async def test_bad_requests_get_an_openai_error_and_reach_no_engine(
    engine: ScriptedEngine, body: bytes, status: int, param: str | None
) -> None:
    async with api_over(engine) as (_, client):
        response = await client.post(
            "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        error = (await response.json())["error"]
    assert response.status == status
    assert error["param"] == param
    assert error["message"] and error["type"] == "invalid_request_error"
    assert engine.requests == []


async def test_the_requests_sampling_reaches_the_engine_and_what_it_omits_is_left_to_it(
    engine: ScriptedEngine,
) -> None:
    sampling = {
        "temperature": 2,
        "top_p": 0.5,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "stop": ["\n\n", "[INST]"],
        "seed": 7,
        "repetition_penalty": 1.2,  # vLLM's extension
        "logprobs": False,  # an OpenAI field this API does not use: ignored
    }
    async with api_over(engine) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat("base", **sampling))
        body = await response.json()
        for extra in ({"stop": "\n\n"}, {}):
            assert (await client.post("/v1/chat/completions", json=chat(**extra))).status == 200
    assert response.status == 200
    sampled = " ".join(scripted_words(QUESTION, "base", temperature=2.0, seed=7))
    assert body["choices"][0]["message"]["content"] == sampled
    assert engine.samplings == [
        Sampling(
            temperature=2.0, top_p=0.5, repetition_penalty=1.2, seed=7, stop=("\n\n", "[INST]")
        ),
        Sampling(stop=("\n\n",)),
        Sampling(),  # every field the operator's
    ]


async def test_a_penalty_the_engines_lack_is_refused_in_one_line_naming_the_way_out(
    engine: ScriptedEngine,
) -> None:
    async with api_over(engine) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat(presence_penalty=1))
        error = (await response.json())["error"]
    assert (response.status, error["param"]) == (400, "presence_penalty")
    assert "repetition_penalty" in error["message"] and "\n" not in error["message"]


async def test_text_parts_and_the_developer_role_reach_the_engine_as_plain_messages(
    engine: ScriptedEngine,
) -> None:
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "are twin tips "},
                {"type": "text", "text": "good for park"},
            ],
        },
    ]
    async with api_over(engine) as (_, client):
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "finetuned", "messages": messages, "max_completion_tokens": 3},
        )
    assert response.status == 200
    assert engine.requests == [
        (
            "finetuned",
            [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "are twin tips good for park"},
            ],
            3,
        )
    ]


async def test_the_clients_conversation_reaches_the_engine_as_sent(
    engine: ScriptedEngine,
) -> None:
    """SYSTEM_PROMPT is the engine's boundary's to add (bot.serving.context.SystemPrompted)."""
    await engine.start()
    settings = dataclasses.replace(ALIASES, system_prompt="Answer briefly.")
    app = create_app(engine, ApiSettings(), engine_settings=settings)
    async with serve_app(app) as url, aiohttp.ClientSession(url) as client:
        response = await client.post("/v1/chat/completions", json=chat("base"))
        assert response.status == 200
    assert engine.requests == [("base", QUESTION, None)]


async def test_max_tokens_cap_is_named_in_the_error(engine: ScriptedEngine) -> None:
    async with api_over(engine, ApiSettings(max_tokens_cap=50)) as (_, client):
        too_many = await client.post("/v1/chat/completions", json=chat(max_tokens=51))
        at_cap = await client.post("/v1/chat/completions", json=chat(max_tokens=50))
        assert "at most 50" in (await too_many.json())["error"]["message"]
    assert (too_many.status, at_cap.status) == (400, 200)


async def test_a_body_over_the_size_cap_is_refused(engine: ScriptedEngine) -> None:
    long_question = [{"role": "user", "content": "powder " * 400}]
    async with api_over(engine, ApiSettings(max_request_bytes=1024)) as (_, client):
        response = await client.post(
            "/v1/chat/completions", json={"model": "base", "messages": long_question}
        )
        error = (await response.json())["error"]
    assert response.status == 413
    assert error["code"] == "request_too_large" and "1024" in error["message"]
    assert engine.requests == []


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (EngineBusy(retry_after_s=2.5), 429),
        (EngineTimeout("too slow"), 504),
        (EngineUnavailable("model gone"), 503),
        (RequestTooLong("the question is too long for this server"), 400),
        (EngineRejected("the inference server refused it"), 400),
        (EngineError("it broke"), 500),
    ],
)
async def test_engine_failures_become_status_codes(
    engine: ScriptedEngine, failure: EngineError, status: int, stream: bool
) -> None:
    engine.failures = [failure]
    async with api_over(engine) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat(stream=stream))
        body = await response.json()
    assert response.status == status
    assert body["error"]["message"] == str(failure)
    if status == 429:
        assert response.headers["Retry-After"] == "3"


async def test_a_failure_after_streaming_started_ends_the_stream_with_an_error_event(
    engine: ScriptedEngine,
) -> None:
    engine.fail_after_words = (2, EngineTimeout("ran out of time"))
    async with (
        api_over(engine) as (_, client),
        client.post("/v1/chat/completions", json=chat(stream=True)) as response,
    ):
        events = await read_events(response)
    assert response.status == 200
    assert events[-2]["error"]["message"] == "ran out of time"
    assert events[-2]["error"]["type"] == "timeout"
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == expected("finetuned", 2)


async def test_a_client_leaving_mid_stream_frees_the_engine(engine: ScriptedEngine) -> None:
    engine.step_s = 0.05
    async with api_over(engine) as (url, _):
        async with aiohttp.ClientSession() as client:
            response = await client.post(f"{url}/v1/chat/completions", json=chat(stream=True))
            await response.content.readline()
            response.close()  # drop the connection mid-answer
        await asyncio.wait_for(engine.was_cancelled.wait(), timeout=5)
    assert engine.cancelled == 1 and engine.in_flight == 0


async def test_a_configured_token_is_required_on_v1_only(engine: ScriptedEngine) -> None:
    async with api_over(engine, ApiSettings(token="s3cret-token")) as (_, client):
        missing = await client.post("/v1/chat/completions", json=chat())
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        right = await client.post(
            "/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer s3cret-token"}
        )
        health = await client.get("/healthz")
        assert (await missing.json())["error"]["code"] == "invalid_api_key"
    assert (missing.status, wrong.status, right.status, health.status) == (401, 401, 200, 200)
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert len(engine.requests) == 1


async def test_unknown_routes_and_methods_answer_in_json(engine: ScriptedEngine) -> None:
    async with api_over(engine) as (_, client):
        missing = await client.get("/v1/embeddings")
        wrong_method = await client.get("/v1/chat/completions")
        assert (await missing.json())["error"]["message"]
        assert (await wrong_method.json())["error"]["message"]
    assert (missing.status, wrong_method.status) == (404, 405)
    assert "POST" in wrong_method.headers["Allow"]


@pytest.mark.parametrize(
    ("host", "token", "allowed"),
    [
        ("127.0.0.1", "", True),
        ("localhost", "", True),
        ("::1", "", True),
        ("0.0.0.0", "", False),
        ("192.168.1.20", "", False),
        ("0.0.0.0", "s3cret", True),
    ],
)
def test_without_a_token_only_loopback_is_allowed(host: str, token: str, allowed: bool) -> None:
    settings = ApiSettings(host=host, token=token)
    if allowed:
        check_bind_allowed(settings)
    else:
        with pytest.raises(UserError, match="API_TOKEN"):
            check_bind_allowed(settings)


def test_main_refuses_a_public_host_without_token_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("API_TOKEN", raising=False)
    assert main(["--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: API_HOST=0.0.0.0")


def test_main_reports_a_port_in_use_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INFERENCE_BACKEND", "openai")
    monkeypatch.delenv("METRICS_PORT", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "API_PORT" in err[-1]


async def test_openai_engine_talks_to_the_api_and_maps_its_errors(engine: ScriptedEngine) -> None:
    """The API works as an OpenAI-compatible server: errors cross the wire as the same errors."""
    async with api_over(engine) as (url, _):
        settings = EngineSettings(backend="openai", openai_base_url=f"{url}/v1", temperature=0.0)
        client = OpenAIEngine(settings, retry=RetryPolicy(attempts=2, initial_backoff_s=0.01))
        await client.start()
        try:
            engine.failures = [EngineUnavailable("restarting")]  # 503: retried
            assert (await client.generate(QUESTION, variant="base")).text == expected("base")
            engine.failures = [EngineBusy(retry_after_s=0.2)] * 2  # 429, Retry-After: 1
            started = time.monotonic()
            with pytest.raises(EngineBusy) as raised:
                await client.generate(QUESTION)
            assert time.monotonic() - started >= 1.0
            assert raised.value.retry_after_s == 1
        finally:
            await client.close()
    assert [variant for variant, *_ in engine.requests] == [
        "base",
        "base",
        "finetuned",
        "finetuned",
    ]


def test_python_m_bot_api_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = {
        "INFERENCE_BACKEND": "openai",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",  # never reached: no question is asked
        "LOG_LEVEL": "INFO",
    }
    with bot_api(env, tmp_path, stop_timeout_s=10) as api:
        body = json.loads(_get(f"{api.url}/models"))
        assert {m["id"] for m in body["data"]} >= {"base", "finetuned"}
        assert api.stop(timeout_s=10) == 0
        assert "stopping" in "".join(api.log)


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


async def test_serve_frees_the_engine_when_a_client_hangs_up_while_waiting(
    engine: ScriptedEngine,
) -> None:
    from bot.api.server import serve
    from tests.loopback import free_port

    engine.step_s = 0.5  # the answer would take 32 s
    port = free_port()
    server = asyncio.create_task(serve(engine, ApiSettings(port=port)))
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with aiohttp.ClientSession() as client:
            for _ in range(50):  # wait for the port
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with client.get(f"http://127.0.0.1:{port}/healthz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
            with contextlib.suppress(asyncio.TimeoutError):
                async with client.post(
                    url, json=chat(), timeout=aiohttp.ClientTimeout(total=0.3)
                ) as response:
                    await response.read()
        await asyncio.wait_for(engine.was_cancelled.wait(), 5)
        assert engine.in_flight == 0
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
