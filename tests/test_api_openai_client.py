"""The HTTP API driven by the official ``openai`` client, the way its users will drive it.

Two servers: ``python -m bot api`` itself as a subprocess, answering with the
tiny model through the local engine (what an operator runs), and the API over
the scripted engine in this process, where failures can be injected exactly.
Both are on loopback. The client's own retries are off unless a test is about
them, so every status code is seen as the client sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.serving.engine import EngineBusy, EngineTimeout, Message
from tests.loopback import bot_api, serve_app
from tests.scripted_engine import ScriptedEngine, scripted_words

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-api-token"
QUESTION: list[Message] = [{"role": "user", "content": "What skis should I get for park?"}]
VARIANTS = ("base", "finetuned")


# ---- python -m bot api, the tiny model, the official client ------------------------------


@pytest.fixture(scope="module")
def api_url(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory) -> Iterator[str]:
    """``python -m bot api`` with a token, one row at a time and a queue of one.

    The operator samples (``TEMPERATURE=1``), so a test that needs one answer
    twice asks for ``temperature=0``, and would fail were it not honoured.
    """
    env = {
        "INFERENCE_BACKEND": "local",
        "BASE_MODEL": str(tiny_model_dir),
        "ADAPTER_PATH": str(tiny_adapter_dir),
        "MAX_NEW_TOKENS": "200",
        "TEMPERATURE": "1",
        "MAX_BATCH": "1",
        "QUEUE_SIZE": "1",
        "API_TOKEN": TOKEN,
        "LOG_LEVEL": "INFO",
    }
    with bot_api(env, tmp_path_factory.mktemp("api")) as api:
        yield api.url


@pytest.fixture(scope="module")
def client(api_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=api_url, api_key=TOKEN, max_retries=0, timeout=60) as official:
        yield official


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_answer_streamed_or_not_is_the_same_for_both_models(
    client: OpenAI, variant: str
) -> None:
    whole = client.chat.completions.create(
        model=variant, messages=QUESTION, max_tokens=12, temperature=0
    )
    (choice,) = whole.choices
    assert whole.object == "chat.completion" and whole.model == variant
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = client.chat.completions.create(
        model=variant,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == choice.message.content  # greedy: the same answer either way
    assert finish == [choice.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )


def test_the_two_models_answer_differently(client: OpenAI) -> None:
    answers = {
        variant: client.chat.completions.create(
            model=variant, messages=QUESTION, max_tokens=12, temperature=0
        )
        .choices[0]
        .message.content
        for variant in VARIANTS
    }
    assert answers["base"] != answers["finetuned"]


def test_temperature_zero_and_a_seed_are_honoured(client: OpenAI) -> None:
    """Against an operator who samples: greedy and seeded answers repeat; unseeded ones
    may or may not, so they are not compared."""

    def answer(
        temperature: float | None = None, top_p: float | None = None, seed: int | None = None
    ) -> str | None:
        # None goes as null, which leaves the field to the operator, as omitting it does.
        completion = client.chat.completions.create(
            model="finetuned",
            messages=QUESTION,
            max_tokens=8,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        return completion.choices[0].message.content

    assert answer(temperature=0) == answer(temperature=0)
    assert answer(seed=11) == answer(seed=11)  # at the operator's temperature
    assert answer(temperature=1.5, top_p=0.95, seed=3) == answer(
        temperature=1.5, top_p=0.95, seed=3
    )


def test_models_lists_both_variants(client: OpenAI) -> None:
    assert {model.id for model in client.models.list()} >= set(VARIANTS)


def test_a_wrong_token_is_an_authentication_error(api_url: str) -> None:
    with (
        OpenAI(base_url=api_url, api_key="not-the-token", max_retries=0) as stranger,
        pytest.raises(openai.AuthenticationError) as raised,
    ):
        stranger.chat.completions.create(model="base", messages=QUESTION)
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"


def test_an_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    assert "base" in raised.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 5),
        ("top_p", 1.5),
        ("max_tokens", 100_000),
        ("stop", ["1", "2", "3", "4", "5"]),
    ],
)
def test_a_bad_body_is_a_bad_request_naming_the_field(
    client: OpenAI, field: str, value: object
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="base", messages=QUESTION, **{field: value})  # type: ignore[call-overload]
    assert raised.value.status_code == 400 and raised.value.param == field


def queue_depth(api_url: str) -> int:
    """What ``/healthz`` says is waiting in the engine's queue (it needs no token)."""
    with urllib.request.urlopen(api_url.removesuffix("/v1") + "/healthz", timeout=5) as response:
        return json.loads(response.read())["engine"]["queue_depth"]


def test_a_full_queue_is_429_with_retry_after(api_url: str, client: OpenAI) -> None:
    """QUEUE_SIZE=1, MAX_BATCH=1: one answer running, one waiting, the third is turned away."""
    running = client.chat.completions.create(
        model="base",
        messages=QUESTION,
        stream=True,
        temperature=0,  # greedy: runs to its length
    )
    first = next(iter(running))  # the worker is generating this one now
    assert first.choices[0].delta.role == "assistant"
    waiting = threading.Thread(
        target=client.chat.completions.create,
        kwargs={"model": "base", "messages": QUESTION, "max_tokens": 2},
    )
    waiting.start()
    try:
        deadline = time.monotonic() + 10
        while queue_depth(api_url) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # until it waits behind the running answer
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(model="base", messages=QUESTION, max_tokens=2)
        assert raised.value.code == "busy"
        assert int(raised.value.response.headers["retry-after"]) >= 1
    finally:
        rest = list(running)
        waiting.join(timeout=60)
    assert rest[-1].choices[0].finish_reason == "length", "the running answer was long enough"


# ---- the API over the scripted engine: exact failures ------------------------------------


@contextlib.asynccontextmanager
async def scripted_api(
    engine: ScriptedEngine, *, max_retries: int = 0
) -> AsyncIterator[AsyncOpenAI]:
    await engine.start()
    async with (
        serve_app(create_app(engine, ApiSettings(token=TOKEN))) as url,
        AsyncOpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=max_retries) as official,
    ):
        yield official


def scripted(variant: str, limit: int = 64) -> str:
    return " ".join(scripted_words(QUESTION, variant)[:limit])  # type: ignore[arg-type]


@pytest.mark.parametrize("stream", [False, True])
async def test_busy_is_429_with_retry_after_streaming_or_not(stream: bool) -> None:
    engine = ScriptedEngine()
    engine.failures = [EngineBusy(retry_after_s=2.5)]
    async with scripted_api(engine) as official:
        with pytest.raises(openai.RateLimitError) as raised:
            await official.chat.completions.create(
                model="finetuned", messages=QUESTION, stream=stream
            )
    assert raised.value.response.headers["retry-after"] == "3"
    assert raised.value.type == "rate_limit_error"


async def test_the_clients_own_retry_waits_what_retry_after_says_then_gets_the_answer() -> None:
    engine = ScriptedEngine()
    engine.failures = [EngineBusy(retry_after_s=0.2)]  # Retry-After: 1
    async with scripted_api(engine, max_retries=1) as official:
        started = time.monotonic()
        answer = await official.chat.completions.create(model="base", messages=QUESTION)
        waited = time.monotonic() - started
    assert answer.choices[0].message.content == scripted("base")
    assert waited >= 1.0
    assert len(engine.requests) == 2


async def test_a_failure_mid_stream_reaches_the_client_as_an_api_error() -> None:
    engine = ScriptedEngine()
    engine.fail_after_words = (2, EngineTimeout("ran out of time"))
    received: list[str] = []
    async with scripted_api(engine) as official:
        stream = await official.chat.completions.create(
            model="finetuned", messages=QUESTION, stream=True
        )
        with pytest.raises(openai.APIError, match="ran out of time"):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == scripted("finetuned", 2)


async def test_concurrent_streams_of_both_models_each_get_their_own_answer() -> None:
    engine = ScriptedEngine(step_s=0.01)

    async def streamed(official: AsyncOpenAI, variant: str) -> str:
        stream = await official.chat.completions.create(
            model=variant, messages=QUESTION, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async with scripted_api(engine) as official:
        texts = await asyncio.gather(*(streamed(official, v) for v in VARIANTS * 2))
    assert texts == [scripted(v) for v in VARIANTS * 2]
