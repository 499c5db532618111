"""POST /v1/feedback and the answers the API records, against a real feedback store (SQLite)."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.api.feedback import ApiFeedback
from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.api.voters import COOKIE
from bot.feedback.aio import AsyncFeedbackStore
from bot.feedback.provenance import Provenance
from bot.feedback.records import AdapterRef
from bot.serving.settings import EngineSettings
from tests.loopback import serve_app
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(30)

QUESTION = [{"role": "user", "content": "twin tips for park"}]
SETTINGS = {"backend": "scripted", "max_new_tokens": 64, "temperature": 0.0}


@contextlib.asynccontextmanager
async def api(
    tmp_path: Path, *, token: str = "", feedback: bool = True, votes_per_minute: int = 30
) -> AsyncIterator[tuple[aiohttp.ClientSession, AsyncFeedbackStore | None]]:
    """The API and a client that keeps no cookies (as curl or a script): it votes as its address."""
    engine = ScriptedEngine()
    await engine.start()
    store = await AsyncFeedbackStore.open(tmp_path / "feedback.sqlite") if feedback else None
    provenance = Provenance("scripted-base", AdapterRef("runs/x/adapter", "abc123"), SETTINGS)
    link = ApiFeedback(store, provenance)
    settings = ApiSettings(token=token, votes_per_minute=votes_per_minute)
    app = create_app(engine, settings, feedback=link if store else None)
    try:
        async with (
            serve_app(app) as url,
            aiohttp.ClientSession(url, cookie_jar=aiohttp.DummyCookieJar()) as client,
        ):
            yield client, store
    finally:
        if store is not None:
            await store.close()


@contextlib.asynccontextmanager
async def browser(client: aiohttp.ClientSession) -> AsyncIterator[aiohttp.ClientSession]:
    """Another browser on the same server: it loads the page first, and keeps its cookies."""
    async with client.get("/healthz") as probe:
        url = probe.url.origin()
    jar = aiohttp.CookieJar(unsafe=True)  # unsafe: keep cookies from an IP address
    headers = dict(client.headers)
    async with aiohttp.ClientSession(url, cookie_jar=jar, headers=headers) as session:
        async with session.get("/") as page:
            assert page.status == 200
        yield session


async def complete(client: aiohttp.ClientSession, model: str, **extra: Any) -> str:
    """Ask and return the completion id (streamed answers are read to their end)."""
    body = {"model": model, "messages": QUESTION, **extra}
    async with client.post("/v1/chat/completions", json=body) as response:
        assert response.status == 200
        if not extra.get("stream"):
            return (await response.json())["id"]
        ids = {
            json.loads(line[6:])["id"]
            async for line in response.content
            if line.startswith(b"data: {")
        }
    (completion_id,) = ids
    return completion_id


async def vote(client: aiohttp.ClientSession, **body: str) -> tuple[int, dict[str, Any]]:
    async with client.post("/v1/feedback", json=body) as response:
        return response.status, await response.json()


async def test_every_answer_is_recorded_under_its_completion_id(tmp_path: Path) -> None:
    async with api(tmp_path) as (client, store):
        plain = await complete(client, "base", max_tokens=3)
        streamed = await complete(client, "finetuned", stream=True)
        # The vote follows the stream's end at once and finds its answer.
        assert (await vote(client, answer_id=streamed, rating="up", voter="v1"))[0] == 200
        first = await store.get_answer(plain)
        second = await store.get_answer(streamed)
    assert first.source == "api"
    assert first.variant == "base"
    assert first.text == "base: twin tips"
    assert first.conversation == QUESTION
    assert first.model == "scripted-base"
    assert first.adapter == AdapterRef("runs/x/adapter", "abc123")
    assert first.settings == {**SETTINGS, "max_new_tokens": 3}  # the request asked for fewer
    assert second.variant == "finetuned"
    assert second.text == "finetuned: park for tips twin end."
    assert second.settings == SETTINGS
    assert second.counts.up == 1


async def test_a_voter_has_one_vote_per_answer_and_may_change_it(tmp_path: Path) -> None:
    async with api(tmp_path) as (client, _), browser(client) as alice, browser(client) as bob:
        answer = await complete(client, "finetuned")
        assert await vote(alice, answer_id=answer, rating="up") == (
            200,
            {"answer_id": answer, "rating": "up", "previous": None, "counts": {"up": 1, "down": 0}},
        )
        status, body = await vote(alice, answer_id=answer, rating="down")
        assert (status, body["previous"], body["counts"]) == (200, "up", {"up": 0, "down": 1})
        status, body = await vote(bob, answer_id=answer, rating="up")
        assert body["counts"] == {"up": 1, "down": 1}


async def test_a_hundred_voter_ids_chosen_by_the_client_count_as_one_voter(tmp_path: Path) -> None:
    async with api(tmp_path, votes_per_minute=0) as (client, store), browser(client) as page:
        # A script without cookies, naming a new voter each time: it is one client.
        scripted = await complete(client, "finetuned")
        for i in range(100):
            status, body = await vote(client, answer_id=scripted, rating="up", voter=f"forged-{i}")
            assert status == 200
        assert body["counts"] == {"up": 1, "down": 0}
        # A browser with its voter cookie, naming a new voter each time: it is one browser.
        browsed = await complete(client, "base")
        for i in range(100):
            status, body = await vote(page, answer_id=browsed, rating="down", voter=f"forged-{i}")
        assert body["counts"] == {"up": 0, "down": 1}
        # Voter cookies made up by the client are not the server's: the vote is the client's.
        forged_cookies = await complete(client, "finetuned", max_tokens=2)
        for _ in range(100):
            cookie = f"{secrets.token_urlsafe(16)}.{secrets.token_hex(16)}"
            async with client.post(
                "/v1/feedback",
                json={"answer_id": forged_cookies, "rating": "up"},
                headers={"Cookie": f"{COOKIE}={cookie}"},
            ) as response:
                assert response.status == 200
                body = await response.json()
        assert body["counts"] == {"up": 1, "down": 0}
        stored = await store.get_answer(forged_cookies)
        assert (stored.counts.up, stored.counts.down) == (1, 0)


async def test_the_page_gives_each_browser_a_signed_voter_cookie_scripts_cannot_read(
    tmp_path: Path,
) -> None:
    async with api(tmp_path) as (client, _):
        async with client.get("/") as first, client.get("/") as second:
            cookies = [first.headers.getone("Set-Cookie"), second.headers.getone("Set-Cookie")]
        for cookie in cookies:
            attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
            assert {"httponly", "samesite", "path", "max-age"} <= attributes
            assert "SameSite=Lax" in cookie
        assert cookies[0] != cookies[1]  # one id per browser
        async with browser(client) as page, page.get("/") as again:
            assert "Set-Cookie" not in again.headers  # a browser that has one keeps it
    async with api(tmp_path, feedback=False) as (client, _), client.get("/") as page:
        assert "Set-Cookie" not in page.headers  # nothing to vote on, no id


async def test_with_a_token_a_client_without_cookie_votes_as_the_token(tmp_path: Path) -> None:
    auth = {"Authorization": "Bearer s3cret"}
    async with api(tmp_path, token="s3cret") as (client, _):
        client.headers.update(auth)
        answer = await complete(client, "finetuned")
        assert (await vote(client, answer_id=answer, rating="up", voter="a"))[0] == 200
        status, body = await vote(client, answer_id=answer, rating="up", voter="b")
        assert body["counts"] == {"up": 1, "down": 0}
        async with browser(client) as page:
            status, body = await vote(page, answer_id=answer, rating="up")
        assert (status, body["counts"]) == (200, {"up": 2, "down": 0})


async def test_votes_are_rate_limited_per_voter_and_per_address(tmp_path: Path) -> None:
    async with api(tmp_path, votes_per_minute=3) as (client, store), browser(client) as page:
        answer = await complete(client, "finetuned")
        for rating in ("up", "down", "up"):
            assert (await vote(page, answer_id=answer, rating=rating))[0] == 200
        async with page.post("/v1/feedback", json={"answer_id": answer, "rating": "down"}) as late:
            assert late.status == 429
            assert int(late.headers["Retry-After"]) >= 1
            error = (await late.json())["error"]
        assert error["code"] == "too_many_votes" and "3 a minute" in error["message"]
        # A fresh browser from the same address is held back too.
        async with browser(client) as fresh:
            assert (await vote(fresh, answer_id=answer, rating="down"))[0] == 429
        stored = await store.get_answer(answer)
        assert (stored.counts.up, stored.counts.down) == (1, 0)


async def test_which_is_better_pairs_two_answers_to_the_same_question(tmp_path: Path) -> None:
    async with api(tmp_path) as (client, store):
        base = await complete(client, "base", stream=True)
        finetuned = await complete(client, "finetuned", stream=True)
        pair = {"base_answer_id": base, "finetuned_answer_id": finetuned}
        status, body = await vote(client, **pair, choice="finetuned", voter="alice")
        assert status == 200
        assert body["counts"] == {"base": 0, "finetuned": 1, "both_bad": 0}
        status, again = await vote(client, **pair, choice="both_bad", voter="alice")
        assert again["pair_id"] == body["pair_id"]
        assert (again["previous"], again["counts"]) == (
            "finetuned",
            {"base": 0, "finetuned": 0, "both_bad": 1},
        )
        stored = await store.get_pair(body["pair_id"])
        assert (stored.base.answer_id, stored.finetuned.answer_id) == (base, finetuned)

        # Swapped, or answers to different questions: not a comparison.
        status, body = await vote(
            client, base_answer_id=finetuned, finetuned_answer_id=base, choice="base", voter="b"
        )
        assert status == 400
        other_body = {"model": "base", "messages": [{"role": "user", "content": "wax?"}]}
        async with client.post("/v1/chat/completions", json=other_body) as response:
            other = (await response.json())["id"]
        fresh = await complete(client, "finetuned")
        status, body = await vote(
            client, base_answer_id=other, finetuned_answer_id=fresh, choice="base", voter="b"
        )
        assert (status, body["error"]["message"]) == (
            400,
            "the two answers are not answers to the same question",
        )


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"answer_id": "chatcmpl-nope", "rating": "up", "voter": "v"}, 404, "no answer"),
        ({"answer_id": "chatcmpl-x", "rating": "meh", "voter": "v"}, 400, "'rating'"),
        ({"answer_id": "chatcmpl-x", "rating": "up"}, 404, "no answer"),  # no voter needed
        ({"answer_id": "a:b", "rating": "up", "voter": "v"}, 400, "'answer_id'"),
        ({"answer_id": "chatcmpl-x"}, 400, "'rating'"),
        ([1, 2], 400, "'rating'"),
    ],
)
async def test_a_bad_vote_is_refused_with_what_to_fix(
    tmp_path: Path, body: Any, status: int, says: str
) -> None:
    async with api(tmp_path) as (client, _), client.post("/v1/feedback", json=body) as response:
        assert response.status == status
        assert says in (await response.json())["error"]["message"]


async def test_votes_need_the_token_and_a_store(tmp_path: Path) -> None:
    async with api(tmp_path, token="s3cret") as (client, _):
        status, body = await vote(client, answer_id="chatcmpl-x", rating="up", voter="v")
        assert status == 401
    async with api(tmp_path, feedback=False) as (client, _):
        status, body = await vote(client, answer_id="chatcmpl-x", rating="up", voter="v")
        assert (status, body["error"]["code"]) == (404, "feedback_disabled")
        async with client.get("/") as response:
            assert 'data-feedback="off"' in await response.text()


async def test_the_page_shows_votes_only_with_a_store(tmp_path: Path) -> None:
    async with api(tmp_path) as (client, _), client.get("/") as response:
        assert 'data-feedback="on"' in await response.text()


async def test_feedback_stamps_the_engine_that_answered(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    local = await ApiFeedback.open(
        tmp_path / "a.sqlite", EngineSettings(base_model="tiny", adapter_path=adapter)
    )
    remote = await ApiFeedback.open(
        tmp_path / "b.sqlite",
        EngineSettings(
            backend="openai", base_model_name="mistral", finetuned_model_name="ski-lora"
        ),
    )
    try:
        assert (local.provenance.model, local.provenance.adapter.path) == ("tiny", str(adapter))
        assert local.provenance.adapter.hash is not None
        assert local.provenance.settings["backend"] == "local"
        assert (remote.provenance.model, remote.provenance.adapter) == (
            "mistral",
            AdapterRef("ski-lora", None),
        )
    finally:
        await local.store.close()
        await remote.store.close()
