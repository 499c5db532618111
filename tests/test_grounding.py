"""Grounded answers in the serving core, and their sources through the HTTP API and the votes.

The store is the bundled sample forum crawled on loopback (``forum_store``,
once per session); the inner engine is the scripted one, which records the
exact messages it was asked, so a test sees the prompt the model would see.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import shutil
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI

from bot.api.feedback import ApiFeedback
from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.console import ConsoleChat
from bot.feedback.aio import AsyncFeedbackStore
from bot.feedback.provenance import Provenance
from bot.feedback.records import AdapterRef
from bot.feedback.store import SCHEMA_VERSION, FeedbackStore
from bot.serving.engine import Message, RequestTooLong
from bot.serving.factory import build_engine
from bot.serving.grounding import GroundedEngine, search_question
from bot.serving.metrics import CountedEngine
from bot.serving.settings import EngineSettings
from crawl.layout import LAYOUT, render_question
from crawl.search import Retriever
from freeski_common.errors import UserError
from tests.loopback import serve_app
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(60)

QUESTION = "What do I need for waxing my skis at home?"


def ask(question: str = QUESTION) -> list[Message]:
    return [{"role": "user", "content": question}]


def expected(store: Path, question: str, k: int = 3):
    with Retriever.open(store) as retriever:
        return retriever.search(question, k)


@asynccontextmanager
async def grounded(store: Path, k: int = 3) -> AsyncIterator[tuple[GroundedEngine, ScriptedEngine]]:
    inner = ScriptedEngine()
    engine = GroundedEngine(inner, store, k)
    await engine.start()
    try:
        yield engine, inner
    finally:
        await engine.close()


# ---- the serving core ------------------------------------------------------------------------


async def test_the_model_is_asked_in_the_training_layout_and_the_answer_carries_its_sources(
    forum_store: Path,
):
    passages = expected(forum_store, QUESTION)
    assert passages and any("Waxing at home" in p.title for p in passages)
    async with grounded(forum_store) as (engine, inner):
        answer = await engine.generate(ask(), variant="base")
        status = engine.status().grounding
    (_, prompt, _) = inner.requests[-1]
    assert prompt == [{"role": "user", "content": render_question(QUESTION, passages)}]
    assert answer.sources == tuple(passages)
    assert status.startswith("on: ") and "k=3" in status and "passages in" in status


async def test_compare_grounds_both_answers_on_the_same_sources(forum_store: Path):
    async with grounded(forum_store, k=2) as (engine, inner):
        base, finetuned = await engine.compare(ask())
    prompts = [messages for _, messages, _ in inner.requests]
    assert prompts[0] == prompts[1] and "Forum posts that may help:" in prompts[0][-1]["content"]
    assert len(base.sources) == 2 and base.sources == finetuned.sources


async def test_a_follow_up_is_searched_with_the_previous_question(forum_store: Path):
    follow_up = "and how long should it cool?"
    conversation: list[Message] = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "An iron, wax, a scraper and a brush."},
        {"role": "user", "content": follow_up},
    ]
    query = search_question(conversation)
    assert query == f"{QUESTION}\n{follow_up}"
    assert search_question([{"role": "user", "content": "which wax for cold snow on rails"}]) == (
        "which wax for cold snow on rails"
    )
    passages = expected(forum_store, query)
    async with grounded(forum_store) as (engine, inner):
        answer = await engine.generate(conversation)
    (_, prompt, _) = inner.requests[-1]
    assert prompt[:2] == conversation[:2], "only the last turn is rewritten"
    assert prompt[-1]["content"] == render_question(follow_up, passages)
    assert answer.sources == tuple(passages) and passages


async def test_a_prompt_too_long_drops_passages_before_the_question(forum_store: Path):
    passages = expected(forum_store, QUESTION)
    async with grounded(forum_store) as (engine, inner):
        inner.failures = [RequestTooLong("too long"), RequestTooLong("too long")]
        answer = await engine.generate(ask())
        assert [len(p[1][-1]["content"]) for p in inner.requests] == sorted(
            (len(p[1][-1]["content"]) for p in inner.requests), reverse=True
        )
        assert inner.requests[-1][1][-1]["content"] == render_question(QUESTION, passages[:1])
        assert answer.sources == tuple(passages[:1])
        inner.failures = [RequestTooLong("too long")] * 4  # even the question alone
        with pytest.raises(RequestTooLong):
            await engine.generate(ask())
        assert inner.requests[-1][1] == ask(), "the last try is the question alone"


async def test_grounding_false_answers_as_without_a_store(forum_store: Path):
    async with grounded(forum_store) as (engine, inner):
        answer = await engine.generate(ask(), grounding=False)
    assert inner.requests[-1][1] == ask() and answer.sources == ()


async def test_a_search_failing_mid_answer_answers_ungrounded(forum_store: Path, caplog):
    async with grounded(forum_store) as (engine, inner):
        assert engine.retriever is not None
        engine.retriever.close()  # as if the file went away under the bot
        answer = await engine.generate(ask())
    assert inner.requests[-1][1] == ask() and answer.sources == ()
    assert "forum search failed" in caplog.text


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda tmp: tmp / "missing.sqlite", "no forum store at"),
        (lambda tmp: _write(tmp / "notes.sqlite", "not a database"), "not a readable forum store"),
        (lambda tmp: _empty_db(tmp / "old.sqlite"), "has no search index"),
    ],
    ids=["missing", "not-a-store", "no-index"],
)
async def test_a_store_that_cannot_be_searched_turns_grounding_off_and_says_why(
    tmp_path: Path, make, says, caplog
):
    async with grounded(make(tmp_path)) as (engine, inner):
        answer = await engine.generate(ask())
        status = engine.status()
    assert status.grounding.startswith("off: ") and says in status.grounding
    assert says in caplog.text
    assert inner.requests[-1][1] == ask() and answer.sources == ()


async def test_grounding_comes_on_once_the_store_is_there(forum_store: Path, tmp_path, monkeypatch):
    later = tmp_path / "forum.sqlite"
    async with grounded(later) as (engine, _):
        assert (await engine.generate(ask())).sources == ()
        await asyncio.to_thread(shutil.copyfile, forum_store, later)  # a crawl wrote it since
        assert (await engine.generate(ask())).sources == (), "not tried again at once"
        monkeypatch.setattr("bot.serving.grounding.RETRY_OPEN_S", 0.0)
        assert (await engine.generate(ask())).sources == tuple(expected(forum_store, QUESTION))
        assert engine.status().grounding.startswith("on: ")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _empty_db(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE threads (id TEXT)")
    return path


# ---- settings and the factory ------------------------------------------------------------------


def test_without_forum_db_the_engine_is_not_grounded_and_status_says_why(monkeypatch, caplog):
    for name in ("FORUM_DB", "GROUNDING_K"):
        monkeypatch.delenv(name, raising=False)
    settings = EngineSettings.from_env()
    assert settings.forum_db is None
    engine = build_engine(EngineSettings(backend="openai"))
    assert not isinstance(engine.inner, GroundedEngine)
    assert engine.status().grounding == "off: FORUM_DB is not set"
    assert "grounding off: FORUM_DB is not set" in caplog.text  # a warning line at start


def test_forum_db_wraps_the_backend_and_k_comes_from_the_adapter(monkeypatch, tmp_path: Path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "grounding.json").write_text(json.dumps({"layout": LAYOUT, "k": 5}))
    monkeypatch.setenv("FORUM_DB", str(tmp_path / "forum.sqlite"))
    monkeypatch.delenv("GROUNDING_K", raising=False)
    settings = dataclasses.replace(
        EngineSettings.from_env(), backend="openai", adapter_path=adapter
    )
    assert settings.forum_db == tmp_path / "forum.sqlite"
    engine = build_engine(settings)
    assert isinstance(engine.inner, GroundedEngine) and engine.inner.k == 5
    engine = build_engine(dataclasses.replace(settings, grounding_k=2))  # GROUNDING_K wins
    assert isinstance(engine.inner, GroundedEngine) and engine.inner.k == 2
    monkeypatch.setenv("GROUNDING_K", "2")
    assert EngineSettings.from_env().grounding_k == 2


def test_an_adapter_trained_on_another_layout_is_refused_in_one_line(tmp_path: Path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "grounding.json").write_text(json.dumps({"layout": "forum-context-v0", "k": 3}))
    settings = EngineSettings(
        backend="openai", forum_db=tmp_path / "f.sqlite", adapter_path=adapter
    )
    with pytest.raises(UserError) as refused:
        build_engine(settings)
    assert "forum-context-v0" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("value", "says"), [("three", "not a whole number"), ("0", "too small"), ("99", "too large")]
)
def test_a_bad_grounding_k_is_one_line(monkeypatch, value: str, says: str):
    monkeypatch.setenv("GROUNDING_K", value)
    with pytest.raises(UserError, match=f"GROUNDING_K.*{says}"):
        EngineSettings.from_env()


# ---- the HTTP API, with the official client; votes record the sources --------------------------


async def test_the_api_returns_sources_streamed_and_not_and_records_them(
    forum_store: Path, tmp_path: Path
):
    passages = expected(forum_store, QUESTION)
    engine = CountedEngine(GroundedEngine(ScriptedEngine(), forum_store, 3))
    await engine.start()
    store = await AsyncFeedbackStore.open(tmp_path / "feedback.sqlite")
    feedback = ApiFeedback(store, Provenance("scripted-base", AdapterRef(), {}))
    app = create_app(engine, ApiSettings(), feedback=feedback)
    try:
        async with serve_app(app) as url:
            client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            plain = await client.chat.completions.create(model="base", messages=ask())
            sources = plain.model_extra["sources"]
            assert [s["post_id"] for s in sources] == [p.post_id for p in passages]
            assert set(sources[0]) == {"title", "url", "thread_id", "post_id", "excerpt", "score"}
            assert sources[0]["url"] == passages[0].url
            assert sources[0]["excerpt"] == passages[0].excerpt

            stream = await client.chat.completions.create(
                model="finetuned",
                messages=ask(),
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].usage is not None
            assert chunks[-1].model_extra["sources"] == sources  # the last chunk carries them
            assert chunks[-2].choices[0].finish_reason is not None
            assert chunks[-2].model_extra["sources"] == sources
            assert all("sources" not in c.model_extra for c in chunks[:-2])

            off = await client.chat.completions.create(
                model="base", messages=ask(), extra_body={"grounding": False}
            )
            assert off.model_extra["sources"] == []
            async with aiohttp.ClientSession() as session, session.get(f"{url}/healthz") as r:
                assert (await r.json())["engine"]["grounding"].startswith("on: ")

            recorded = await store.get_answer(plain.id)
            streamed = await store.get_answer(chunks[0].id)
            ungrounded = await store.get_answer(off.id)
    finally:
        await store.close()
        await engine.close()
    shown = [
        {**s, "author": p.author, "text": p.text} for s, p in zip(sources, passages, strict=True)
    ]
    assert recorded.sources == shown and streamed.sources == shown
    assert ungrounded.sources == []


def test_a_feedback_store_from_before_sources_is_migrated(tmp_path: Path):
    path = tmp_path / "feedback.sqlite"
    with FeedbackStore(path, salt=b"s") as store:
        record = Provenance("m", AdapterRef(), {}).record(ask(), "an answer", "base", "api")
        store.record_answer(record)
    with sqlite3.connect(path) as db:  # back to version 1: no sources column
        db.execute("ALTER TABLE answers DROP COLUMN sources")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with FeedbackStore(path, salt=b"s") as store:
        assert store.get_answer(record.answer_id).sources == []
        later = Provenance("m", AdapterRef(), {}).record(ask(), "another", "base", "api")
        store.record_answer(later)
    with sqlite3.connect(path) as db:
        (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == str(SCHEMA_VERSION)  # and every later step after it


async def test_the_console_prints_the_sources_and_its_status_says_grounding(forum_store: Path):
    passages = expected(forum_store, QUESTION)
    out = io.StringIO()
    async with grounded(forum_store) as (engine, _):
        chat = ConsoleChat(engine, out=out)
        await chat.handle("/status")
        await chat.handle(QUESTION)
    shown = out.getvalue()
    assert shown.startswith("grounding on: ")
    assert "sources:\n  [1] " in shown
    assert all(p.url in shown and p.excerpt in shown for p in passages)
    assert chat.history[-1]["content"].count("sources:") == 0  # the model's text only


@pytest.mark.timeout(180)
async def test_the_local_engine_gets_fewer_passages_until_the_prompt_fits(
    forum_store: Path, tiny_model_dir: Path
):
    """The real worker's RequestTooLong (the tiny model, a small token budget) drops passages."""
    from bot.serving.local_engine import LocalEngine
    from finetune.generation import encode_chats
    from finetune.modeling import load_for_inference

    model, tokenizer = load_for_inference(tiny_model_dir, load_in_4bit=False)
    passages = expected(forum_store, QUESTION)
    sizes = [
        len(encode_chats(tokenizer, [ask(render_question(QUESTION, passages[:n]))])["input_ids"][0])
        for n in (1, 2)
    ]
    answer_tokens = 4
    settings = EngineSettings(
        max_new_tokens=answer_tokens,
        temperature=0.0,
        max_batch_tokens=(sizes[0] + sizes[1]) // 2 + answer_tokens,  # room for one passage
    )
    local = LocalEngine(settings, model_and_tokenizer=(model, tokenizer))
    engine = GroundedEngine(local, forum_store, 3)
    await engine.start()
    try:
        answer = await engine.generate(ask(), variant="base")
    finally:
        await engine.close()
    assert answer.sources == tuple(passages[:1])
    assert answer.completion_tokens > 0
