"""One test suite every :class:`~bot.serving.engine.Engine` must pass, whatever answers behind it.

The Discord bot, the HTTP API and the demo only know the protocol, so each
engine is held to the same behaviour: streamed text is the answer, both
variants answer and differ, ``compare`` equals two single answers, concurrent
questions never mix, status and metrics count what was served, a closed
engine refuses work, and each request samples as it asked whatever the
operator set (temperature 0 is greedy, a seed repeats a sampled answer alone
or in a busy batch). Each is wrapped in the :class:`CountedEngine` boundary, as
``build_engine`` wraps it, so the metrics are checked the way they are counted. The engines:

- ``scripted``: the test double the API tests stand on (it must honour the contract too);
- ``openai-over-api``: :class:`OpenAIEngine` talking to this project's own API, over the
  scripted engine, on loopback: the API works as an OpenAI-compatible server;
- ``openai-over-fake``: :class:`OpenAIEngine` against a vLLM-like loopback server;
- ``local``: :class:`LocalEngine` with the tiny model and a random adapter (4-bit, CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.serving.context import SystemPrompted, normalize_conversation
from bot.serving.engine import VARIANTS, Engine, EngineError, Message, Sampling, UnknownModel
from bot.serving.factory import around, build_engine
from bot.serving.grounding import GroundedEngine
from bot.serving.metrics import UNKNOWN_MODEL, CountedEngine, outcome_of
from bot.serving.openai_engine import OpenAIEngine, RetryPolicy
from bot.serving.settings import EngineSettings
from tests.fake_openai import FakeOpenAIServer
from tests.loopback import serve_app
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(120)

QUESTION: list[Message] = [{"role": "user", "content": "How do I stop catching edges on rails?"}]
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0, "max_new_tokens": 8}
# An operator who samples: a request's own temperature 0 or seed must win over it.
SAMPLED = {**GREEDY, "temperature": 1.0}
FAST_RETRY = RetryPolicy(attempts=2, initial_backoff_s=0.01)

EngineFactory = Callable[[pytest.FixtureRequest], contextlib.AbstractAsyncContextManager[Engine]]


def operator_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The operator's sampling settings the engines are built with (the ``operator`` fixture)."""
    settings: dict[str, Any] = request.getfixturevalue("operator")
    return settings


@contextlib.asynccontextmanager
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    operator = operator_settings(request)
    yield ScriptedEngine(
        max_new_tokens=operator["max_new_tokens"], temperature=operator["temperature"]
    )


@contextlib.asynccontextmanager
async def openai_over_api(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    backend = ScriptedEngine()
    await backend.start()
    async with serve_app(create_app(backend, ApiSettings())) as url:
        yield OpenAIEngine(
            EngineSettings(
                backend="openai", openai_base_url=f"{url}/v1", **operator_settings(request)
            ),
            retry=FAST_RETRY,
        )
    await backend.close()


@contextlib.asynccontextmanager
async def openai_over_fake(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    async with FakeOpenAIServer(sampling=True) as server:
        yield OpenAIEngine(
            EngineSettings(
                backend="openai",
                openai_base_url=server.url,
                base_model_name="base-model-id",
                finetuned_model_name="freeski-lora",
                **operator_settings(request),
            ),
            retry=FAST_RETRY,
        )


@contextlib.asynccontextmanager
async def local(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    local_engine = pytest.importorskip(
        "bot.serving.local_engine", reason="bot.serving.local_engine not built yet"
    )
    model_dir: Path = request.getfixturevalue("tiny_model_dir")
    adapter_dir: Path = request.getfixturevalue("tiny_adapter_dir")
    settings = EngineSettings(
        base_model=str(model_dir),
        adapter_path=adapter_dir,
        max_batch=8,
        **operator_settings(request),
    )
    yield local_engine.LocalEngine(
        settings, model_and_tokenizer=request.getfixturevalue("tiny_loaded")
    )


@contextlib.asynccontextmanager
async def grounded_openai_over_fake(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    """The grounding wrapper keeps the contract: a vLLM-like server, the sample forum's store."""
    store: Path = request.getfixturevalue("forum_store")
    async with openai_over_fake(request) as inner:
        yield GroundedEngine(inner, store, 3)


ENGINES: dict[str, EngineFactory] = {
    "scripted": scripted,
    "openai-over-api": openai_over_api,
    "openai-over-fake": openai_over_fake,
    "grounded-openai-over-fake": grounded_openai_over_fake,
    "local": local,
}


@pytest.fixture
def operator() -> dict[str, Any]:
    """Greedy, so every engine's answers can be compared; the sampling tests override it."""
    return GREEDY


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir: Path, tiny_adapter_dir: Path) -> tuple[Any, Any]:
    """The tiny model, 4-bit with the adapter unmerged, loaded once for every local test."""
    from finetune.modeling import load_for_inference

    return load_for_inference(tiny_model_dir, tiny_adapter_dir, load_in_4bit=True)


@pytest.fixture(params=list(ENGINES))
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    async with ENGINES[request.param](request) as built:
        assert isinstance(built, Engine)
        counted = CountedEngine(built)
        assert isinstance(counted, Engine)
        await counted.start()
        try:
            yield counted
        finally:
            await counted.close()


def answers_counted(variant: str, outcome: str) -> float:
    labels = {"variant": variant, "outcome": outcome}
    return REGISTRY.get_sample_value("freeski_answers_total", labels) or 0.0


def tokens_counted(variant: str) -> float:
    labels = {"variant": variant}
    return REGISTRY.get_sample_value("freeski_generated_tokens_total", labels) or 0.0


async def test_streamed_text_is_the_answer(engine: Engine) -> None:
    for variant in VARIANTS:
        deltas: list[str] = []
        answer = await engine.generate(
            QUESTION, variant=variant, max_new_tokens=6, on_text=deltas.append
        )
        assert answer.variant == variant
        assert "".join(deltas) == answer.text
        assert 0 < answer.completion_tokens <= 6
        assert answer.finish_reason in ("stop", "length")
        if answer.finish_reason == "length":
            assert answer.completion_tokens == 6
        if answer.text:
            assert answer.first_token_s is not None
            assert 0 <= answer.first_token_s <= answer.total_s


async def test_no_answer_is_longer_than_the_engine_allows(engine: Engine) -> None:
    """MAX_NEW_TOKENS is the longest answer, whoever asks for more (the HTTP API passes
    its clients' max_tokens through)."""
    answer = await engine.generate(QUESTION, max_new_tokens=1000)
    assert 0 < answer.completion_tokens <= GREEDY["max_new_tokens"]
    assert answer.finish_reason == "length"


async def test_variants_differ_and_compare_equals_each_alone(engine: Engine) -> None:
    base = await engine.generate(QUESTION, variant="base", max_new_tokens=6)
    finetuned = await engine.generate(QUESTION, variant="finetuned", max_new_tokens=6)
    assert base.text != finetuned.text

    streamed = {"base": "", "finetuned": ""}

    def on_text(variant: str, text: str) -> None:
        streamed[variant] += text

    compared = await engine.compare(QUESTION, max_new_tokens=6, on_text=on_text)
    assert [a.variant for a in compared] == ["base", "finetuned"]
    assert [a.text for a in compared] == [base.text, finetuned.text]
    assert streamed == {"base": base.text, "finetuned": finetuned.text}


async def test_models_name_what_answers_and_another_name_is_refused(engine: Engine) -> None:
    models = engine.models()
    assert models.names[:2] == ("base", "finetuned")
    assert models.adapter("base") is None
    assert models.adapter("finetuned") is not None
    refused = outcome_of(UnknownModel("no such model"))
    unknown_before = answers_counted(UNKNOWN_MODEL, refused)
    with pytest.raises(UnknownModel):
        await engine.generate(QUESTION, variant="no-such-model", max_new_tokens=2)
    assert answers_counted("no-such-model", refused) == 0, "made-up names make no metrics"
    assert answers_counted(UNKNOWN_MODEL, refused) == unknown_before + 1
    base = await engine.generate(QUESTION, variant="base", max_new_tokens=6)
    finetuned = await engine.generate(QUESTION, variant="finetuned", max_new_tokens=6)
    first, second = await engine.compare(QUESTION, models=("finetuned", "base"), max_new_tokens=6)
    assert (first.variant, first.text) == ("finetuned", finetuned.text)
    assert (second.variant, second.text) == ("base", base.text)


async def test_concurrent_questions_each_get_their_own_answer(engine: Engine) -> None:
    questions: list[list[Message]] = [
        [{"role": "user", "content": f"Best {topic}?"}]
        for topic in ("skis", "boots", "bindings", "poles")
    ]
    alone = [(await engine.generate(q, max_new_tokens=5)).text for q in questions]
    together = await asyncio.gather(*(engine.generate(q, max_new_tokens=5) for q in questions))
    assert [a.text for a in together] == alone
    assert len(set(alone)) > 1


async def test_status_counts_what_was_served(engine: Engine) -> None:
    before = engine.status()
    answer = await engine.generate(QUESTION, max_new_tokens=4)
    after = engine.status()
    assert after.ready and after.backend == before.backend and after.backend
    assert after.requests_served == before.requests_served + 1
    assert after.tokens_generated == before.tokens_generated + answer.completion_tokens
    assert after.queue_depth == 0
    assert after.uptime_s >= before.uptime_s


async def test_answers_are_counted_in_the_shared_metrics(
    engine: Engine, request: pytest.FixtureRequest
) -> None:
    answers_before = {outcome: answers_counted("base", outcome) for outcome in ("stop", "length")}
    tokens_before = tokens_counted("base")
    answer = await engine.generate(QUESTION, variant="base", max_new_tokens=4)
    outcome = answer.finish_reason
    assert answers_counted("base", outcome) == answers_before[outcome] + 1
    assert tokens_counted("base") == tokens_before + answer.completion_tokens


async def test_start_is_idempotent_and_a_closed_engine_refuses_work(engine: Engine) -> None:
    await engine.start()
    assert (await engine.generate(QUESTION, max_new_tokens=2)).completion_tokens > 0
    await engine.close()
    assert engine.status().ready is False
    with pytest.raises(EngineError):
        await engine.generate(QUESTION, max_new_tokens=2)
    await engine.close()


def test_the_factory_builds_the_configured_backend() -> None:
    remote = build_engine(EngineSettings(backend="openai"))
    assert isinstance(remote, CountedEngine), "every backend is counted at the boundary"
    assert isinstance(remote.inner, OpenAIEngine)
    local_engine = pytest.importorskip(
        "bot.serving.local_engine", reason="bot.serving.local_engine not built yet"
    )
    local = build_engine(EngineSettings(backend="local"))
    assert isinstance(local, CountedEngine)
    assert isinstance(local.inner, local_engine.LocalEngine)


class TestEachRequestSamplesAsItAsks:
    """An operator who samples, and requests that ask for their own sampling."""

    @pytest.fixture
    def operator(self) -> dict[str, Any]:
        return SAMPLED

    async def test_temperature_zero_gives_the_same_answer_twice(self, engine: Engine) -> None:
        greedy = Sampling(temperature=0.0)
        first, second = [
            (await engine.generate(QUESTION, max_new_tokens=6, sampling=greedy)).text
            for _ in range(2)
        ]
        assert first == second

    async def test_a_seed_gives_the_same_answer_alone_and_in_a_busy_batch(
        self, engine: Engine
    ) -> None:
        seeded = Sampling(seed=1234)  # sampled at the operator's temperature
        alone = await engine.generate(QUESTION, max_new_tokens=6, sampling=seeded)
        others: list[list[Message]] = [
            [{"role": "user", "content": f"Best {topic}?"}] for topic in ("skis", "boots", "wax")
        ]
        busy = await asyncio.gather(
            engine.generate(QUESTION, max_new_tokens=6, sampling=seeded),
            *(engine.generate(q, max_new_tokens=6) for q in others),
            engine.generate(QUESTION, max_new_tokens=6, sampling=Sampling(seed=99)),
        )
        assert busy[0].text == alone.text
        _, finetuned = await engine.compare(QUESTION, max_new_tokens=6, sampling=seeded)
        assert finetuned.text == alone.text, "compare samples each row with the same seed"


async def test_the_local_worker_and_an_openai_server_are_sent_the_same_conversation(
    forum_store: Path,
    tiny_model_dir: Path,
    tiny_loaded: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The factory's boundary applies SYSTEM_PROMPT and the forum's passages once, for every
    backend: what a front end sends is the user's conversation only."""
    from bot.serving.local_engine import LocalEngine
    from bot.serving.worker import GenerationRequest

    conversation: list[Message] = [
        {"role": "user", "content": "What do I need for waxing my skis at home?"},
        {"role": "assistant", "content": "An iron and wax."},
        {"role": "user", "content": "and a scraper?"},
    ]
    boundary = EngineSettings(system_prompt="Answer briefly.", forum_db=forum_store, **GREEDY)
    local_settings = dataclasses.replace(boundary, base_model=str(tiny_model_dir))
    local_backend = LocalEngine(local_settings, model_and_tokenizer=tiny_loaded)
    local = around(local_backend, local_settings)
    submitted: list[GenerationRequest] = []
    await local.start()
    try:
        worker = local_backend.worker
        submit = worker.submit

        def spy(*requests: GenerationRequest) -> int:
            submitted.extend(requests)
            return submit(*requests)

        monkeypatch.setattr(worker, "submit", spy)
        answered_locally = await local.generate(conversation, variant="base", max_new_tokens=2)
    finally:
        await local.close()
    async with FakeOpenAIServer() as server:
        remote_settings = dataclasses.replace(
            boundary, backend="openai", openai_base_url=server.url, base_model_name="base-model-id"
        )
        remote = around(OpenAIEngine(remote_settings, retry=FAST_RETRY), remote_settings)
        await remote.start()
        try:
            answered_remotely = await remote.generate(conversation, variant="base")
        finally:
            await remote.close()

    (request,) = submitted
    sent = normalize_conversation([{**m} for m in request.messages])
    assert sent == server.requests[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "Answer briefly."}
    assert "Forum posts that may help:" in sent[-1]["content"]
    assert sent[1:3] == conversation[:2], "only the question is rewritten"
    assert answered_locally.sources == answered_remotely.sources != ()


def test_the_boundary_puts_each_stage_around_the_backend_once(forum_store: Path) -> None:
    settings = EngineSettings(
        backend="openai", system_prompt="Answer briefly.", forum_db=forum_store
    )
    counted = build_engine(settings)
    assert isinstance(counted.inner, SystemPrompted)
    assert isinstance(counted.inner.inner, GroundedEngine)
    assert isinstance(counted.inner.inner.inner, OpenAIEngine)
    plain = build_engine(EngineSettings(backend="openai"))
    assert isinstance(plain.inner, OpenAIEngine), "no stage without its setting"
