"""Hostile requests against the API: each gets a 4xx that names the problem, never a 500.

The API runs over the scripted engine on loopback in this process. The
property tests throw thousands of random and mutated bodies at every POST
endpoint from a plain HTTP client on this thread while the server runs on
its own loop in another, and assert that none is answered 5xx, that the
server still answers a good request afterwards, and that nothing logged a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.api.feedback import ApiFeedback
from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.feedback.aio import AsyncFeedbackStore
from bot.feedback.provenance import Provenance
from bot.feedback.records import AdapterRef
from tests.loopback import serve_app
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(120)

QUESTION = [{"role": "user", "content": "twin tips for park"}]
GOOD_CHAT = {"model": "finetuned", "messages": QUESTION, "max_tokens": 8}
GOOD_VOTE = {"answer_id": "chatcmpl-abc", "rating": "up", "voter": "someone"}
ENDPOINTS = ("/v1/chat/completions", "/v1/feedback")


@contextlib.asynccontextmanager
async def api(
    tmp_path: Path, settings: ApiSettings | None = None
) -> AsyncIterator[tuple[str, ScriptedEngine]]:
    """The API with feedback on, over a scripted engine; its URL."""
    engine = ScriptedEngine()
    await engine.start()
    store = await AsyncFeedbackStore.open(tmp_path / "feedback.sqlite")
    provenance = Provenance("scripted-base", AdapterRef("runs/x/adapter", "abc123"), {})
    app = create_app(engine, settings or ApiSettings(), feedback=ApiFeedback(store, provenance))
    try:
        async with serve_app(app) as url:
            yield url, engine
    finally:
        await store.close()


async def post(url: str, path: str, body: bytes | Any, **headers: str) -> tuple[int, Any, Any]:
    """Status, decoded JSON body and headers of one POST (``body`` bytes are sent as they are)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as client,
        client.post(url + path, data=data, headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None), response.headers


# ---- the bodies the issue found, one by one -----------------------------------------------

HOSTILE_BODIES = {
    "deep nesting": b"[" * 60_000,
    "deep nesting, closed": b"[" * 30_000 + b"]" * 30_000,
    "a 5,000-digit integer": b'{"max_tokens": ' + b"9" * 5_000 + b"}",
    "a 5,000-digit integer in a vote": b'{"rating": "up", "answer_id": ' + b"1" * 5_000 + b"}",
}


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("name", HOSTILE_BODIES)
async def test_bodies_python_cannot_parse_are_a_400_not_a_500(
    tmp_path: Path, path: str, name: str, caplog: pytest.LogCaptureFixture
):
    async with api(tmp_path) as (url, _):
        status, body, _ = await post(url, path, HOSTILE_BODIES[name])
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error"
    assert "\n" not in body["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        (
            [*QUESTION, {"role": "assistant", "content": "word " * 5_000}],
            "messages",
            "must end with a user message",
        ),
        ([{"role": "user", "content": "\ud800x"}], "messages[0].content", "lone UTF-16 surrogate"),
        (QUESTION * 300, "messages", "at most 256"),
    ],
    ids=["ends with an assistant turn", "lone surrogate", "too many messages"],
)
async def test_a_conversation_that_cannot_be_answered_is_a_400_naming_it(
    tmp_path: Path, messages: list[dict[str, str]], param: str, words: str
):
    async with api(tmp_path) as (url, engine):
        status, body, _ = await post(
            url, "/v1/chat/completions", {**GOOD_CHAT, "messages": messages}
        )
    assert status == 400, body
    assert body["error"]["param"] == param
    assert words in body["error"]["message"]
    assert engine.requests == [], "refused at the edge, never queued"


async def test_the_message_cap_is_a_setting(tmp_path: Path):
    async with api(tmp_path, ApiSettings(max_messages=2)) as (url, _):
        few, _, _ = await post(url, "/v1/chat/completions", GOOD_CHAT)
        many, body, _ = await post(
            url, "/v1/chat/completions", {**GOOD_CHAT, "messages": QUESTION * 3}
        )
    assert (few, many) == (200, 400)
    assert "at most 2" in body["error"]["message"]


async def test_one_client_over_its_rate_limit_gets_429_with_retry_after(tmp_path: Path):
    async with api(tmp_path, ApiSettings(rate_limit_per_minute=3)) as (url, engine):
        statuses = [(await post(url, "/v1/chat/completions", GOOD_CHAT))[0] for _ in range(3)]
        status, body, headers = await post(url, "/v1/chat/completions", GOOD_CHAT)
    assert statuses == [200, 200, 200]
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert len(engine.requests) == 3, "the fourth never reached the engine"


async def test_with_a_token_the_rate_limit_counts_per_token(tmp_path: Path):
    limited = ApiSettings(token="t0ken", rate_limit_per_minute=1)
    auth = {"Authorization": "Bearer t0ken"}
    async with api(tmp_path, limited) as (url, _):
        first, _, _ = await post(url, "/v1/chat/completions", GOOD_CHAT, **auth)
        second, _, _ = await post(url, "/v1/chat/completions", GOOD_CHAT, **auth)
    assert (first, second) == (200, 429)


# ---- thousands of random and mutated bodies ------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
KEYS = st.sampled_from(
    [
        "model",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "include_usage",
        "temperature",
        "stop",
        "n",
        "seed",
        "answer_id",
        "rating",
        "voter",
        "choice",
        "base_answer_id",
        "finetuned_answer_id",
    ]
)


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with one place in it replaced, removed or given a new key."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        action = draw(st.sampled_from(["replace", "drop", "recurse", "add"]))
        if action == "drop":
            return {k: v for k, v in value.items() if k != key}
        if action == "add":
            return {**value, draw(KEYS): draw(JSON)}
        inner = draw(mutated(value[key])) if action == "recurse" else draw(JSON)
        return {**value, key: inner}
    if isinstance(value, list) and value and draw(st.booleans()):
        index = draw(st.integers(0, len(value) - 1))
        return [*value[:index], draw(mutated(value[index])), *value[index + 1 :]]
    return draw(JSON)


GOOD_BODIES = [
    GOOD_CHAT,
    {**GOOD_CHAT, "stream": True, "stream_options": {"include_usage": True}},
    {"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    GOOD_VOTE,
    {"base_answer_id": "a", "finetuned_answer_id": "b", "choice": "base", "voter": "v"},
]
BODIES = (
    JSON.map(lambda v: json.dumps(v).encode())
    | st.sampled_from(GOOD_BODIES).flatmap(mutated).map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=64)
    | st.integers(900, 60_000).map(lambda depth: b"[" * depth)
    | st.integers(4_301, 6_000).map(lambda digits: b'{"max_tokens": ' + b"7" * digits + b"}")
)


class ServerThread:
    """The API on loopback, on its own event loop in a thread; plain ``http.client`` talks to it."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        async with api(self._tmp_path, ApiSettings(rate_limit_per_minute=0)) as (url, _):
            self.port = int(url.rsplit(":", 1)[1])
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10)
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        return self

    def __exit__(self, *_: object) -> None:
        self.connection.close()
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            self.connection.request(
                "POST", path, body=body, headers={"Content-Type": "application/json"}
            )
            response = self.connection.getresponse()
            return response.status, response.read()
        except (http.client.HTTPException, OSError):
            self.connection.close()  # the server closed it (a 4xx it answers by closing)
            raise


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path) as running:
        yield running


@settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=st.sampled_from(ENDPOINTS), body=BODIES)
def test_no_body_is_answered_with_a_5xx(server: ServerThread, path: str, body: bytes):
    status, answer = server.post(path, body)
    assert status < 500, (status, answer[:300])


def test_after_the_storm_the_server_answers_and_logged_no_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture
):
    """The same kinds of bodies, then a good request: answered, and the log holds no traceback."""
    statuses = []

    @settings(max_examples=500, deadline=None, derandomize=True)
    @given(path=st.sampled_from(ENDPOINTS), body=BODIES)
    def storm(path: str, body: bytes) -> None:
        statuses.append(server.post(path, body)[0])

    with caplog.at_level(logging.INFO):
        storm()
    status, answer = server.post("/v1/chat/completions", json.dumps(GOOD_CHAT).encode())
    assert status == 200, answer
    assert json.loads(answer)["choices"][0]["message"]["content"]
    assert max(statuses) < 500
    assert 400 in statuses
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


async def test_healthz_is_503_naming_the_state_when_the_worker_loop_is_not_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    async with api(tmp_path) as (url, engine), aiohttp.ClientSession(url) as client:
        async with client.get("/healthz") as response:
            assert (response.status, (await response.json())["status"]) == (200, "ok")
        real = engine.status
        monkeypatch.setattr(engine, "status", lambda: dataclasses.replace(real(), worker="stalled"))
        async with client.get("/healthz") as response:
            body = await response.json()
    assert response.status == 503
    assert body["status"] == "stalled" and body["engine"]["worker"] == "stalled"
