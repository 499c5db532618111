"""The web chat in a real browser: headless Chromium, driven by Playwright.

Streaming, compare, history and the token run against ``python -m bot api``
serving the tiny model. What the tiny model cannot be made to say (HTML in an
answer) and failures on demand (busy, timeout, server down) run against the
same API over the scripted engine, in process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page, expect

from bot.api.feedback import ApiFeedback
from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.feedback.aio import AsyncFeedbackStore
from bot.feedback.provenance import Provenance
from bot.feedback.records import AdapterRef
from bot.feedback.store import FeedbackStore
from bot.serving.engine import EngineBusy, EngineStatus, EngineTimeout
from tests.browser import chromium, open_page
from tests.loopback import bot_api, serve_app
from tests.scripted_adapters import ScriptedAdapters
from tests.scripted_engine import ScriptedEngine

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

TOKEN = "webchat-test-token-7f3a"
TOKEN_KEY = "freeski-api-token"  # where the page keeps it (static/api.js)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


@pytest_asyncio.fixture(loop_scope="module")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    context = await browser.new_context(viewport={"width": 1100, "height": 800})
    try:
        yield context
    finally:
        await context.close()


# ---- python -m bot api serving the tiny model, with a token --------------------------------


@dataclass
class WebChatApi:
    url: str  # the page's address: http://127.0.0.1:PORT/
    log: list[str]  # what the server wrote to stderr once it listened
    feedback_db: Path


@pytest.fixture(scope="module")
def tiny_api(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebChatApi]:
    workdir = tmp_path_factory.mktemp("webchat-api")
    feedback_db = workdir / "feedback.sqlite"
    env = {
        "INFERENCE_BACKEND": "local",
        "BASE_MODEL": str(tiny_model_dir),
        "ADAPTER_PATH": str(tiny_adapter_dir),
        # Long enough that the answer streams over many reads and frames even on a fast, idle
        # machine (at 64 tokens the whole answer once arrived in one read).
        "MAX_NEW_TOKENS": "256",
        "TEMPERATURE": "0",
        "API_TOKEN": TOKEN,
        "LOG_LEVEL": "DEBUG",
        "FEEDBACK_DB": str(feedback_db),
    }
    with bot_api(env, workdir) as api:
        yield WebChatApi(api.url.removesuffix("v1"), api.log, feedback_db)


@pytest_asyncio.fixture(loop_scope="module")
async def signed_in(context: BrowserContext, tiny_api: WebChatApi) -> BrowserContext:
    """A context whose tabs start with the right token, as after typing it once."""
    await context.add_init_script(f"sessionStorage.setItem({TOKEN_KEY!r}, {TOKEN!r})")
    return context


def streamed_text(event_stream: str) -> str:
    """The answer text carried by an event stream, as the API sent it."""
    return "".join(
        choice["delta"].get("content", "")
        for line in event_stream.splitlines()
        if line.startswith("data: {")
        for choice in json.loads(line.removeprefix("data: "))["choices"]
    )


def as_shown(text: str) -> str:
    """Text without what Markdown rendering changes (whitespace, emphasis marks)."""
    return re.sub(r"[\s*_`]", "", text)


async def test_a_wrong_token_is_refused_in_words_and_the_right_one_is_kept_for_the_tab(
    context: BrowserContext, tiny_api: WebChatApi
) -> None:
    page, errors = await open_page(context)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    await page.goto(tiny_api.url)
    token_form = page.locator("#token-form")
    await expect(token_form).to_contain_text("This server needs its API token")
    await expect(page.locator("#ask-form")).to_be_hidden()

    await page.get_by_label("API token").fill("not-the-token")
    await page.get_by_role("button", name="Use token").click()
    await expect(token_form).to_contain_text("The server refused the API token")
    await page.get_by_label("API token").fill(TOKEN)
    await page.get_by_role("button", name="Use token").click()
    await expect(token_form).to_be_hidden()
    await expect(page.get_by_label("Your question")).to_be_visible()

    async with page.expect_response("**/v1/models") as checked:
        await page.reload()  # same tab: not asked again
    assert (await checked.value).status == 200
    await expect(token_form).to_be_hidden()
    other_tab, _ = await open_page(context)
    await other_tab.goto(tiny_api.url)  # another tab asks for it again
    await expect(other_tab.locator("#token-form")).to_be_visible()

    assert urls and not [url for url in urls if TOKEN in url]
    assert not [line for line in tiny_api.log if TOKEN in line]
    assert any("/v1/models" in line for line in tiny_api.log)  # the log does cover the requests
    assert errors.errors == []


async def test_a_question_streams_its_answer_word_by_word(
    signed_in: BrowserContext, tiny_api: WebChatApi
) -> None:
    page, errors = await open_page(signed_in)
    await page.goto(tiny_api.url)
    await expect(page.get_by_label("Your question")).to_be_visible()
    await page.evaluate(
        """() => {
            window.snapshots = [];
            new MutationObserver(() => {
                const body = document.querySelector(".answer .body");
                if (body && body.textContent !== window.snapshots.at(-1)) {
                    window.snapshots.push(body.textContent);
                }
            }).observe(document.getElementById("transcript"),
                       {subtree: true, childList: true, characterData: true});
        }"""
    )
    async with page.expect_response("**/v1/chat/completions") as info:
        await ask(page, "What skis should I get for park?")
    response = await info.value
    await answered(page, "finetuned")

    sent = json.loads(response.request.post_data)
    assert sent["model"] == "finetuned"
    assert sent["stream"] is True
    stream = await response.text()
    assert stream.count('"content": "') >= 4, stream  # the role, then piece after piece
    shown = await answer(page, "finetuned").locator(".body").text_content()
    assert as_shown(shown) == as_shown(streamed_text(stream)) != ""
    # The page showed it growing, not all at once (pieces that arrive together render once).
    snapshots = [text for text in await page.evaluate("window.snapshots") if text]
    assert len(snapshots) >= 2, snapshots
    assert all(as_shown(shown).startswith(as_shown(snapshot)) for snapshot in snapshots)
    assert errors.errors == []


async def test_the_chat_so_far_is_sent_with_each_question_until_a_new_chat(
    signed_in: BrowserContext, tiny_api: WebChatApi
) -> None:
    page, errors = await open_page(signed_in)
    await page.goto(tiny_api.url)
    questions = ["Is a 180 ski too long for me?", "And for the park?", "Best wax for spring?"]

    async def turn(question: str) -> tuple[list[dict[str, str]], str]:
        async with page.expect_response("**/v1/chat/completions") as info:
            await ask(page, question)
        response = await info.value
        await answered(page, "finetuned")
        return json.loads(response.request.post_data)["messages"], streamed_text(
            await response.text()
        )

    first_sent, first_answer = await turn(questions[0])
    assert first_sent == [{"role": "user", "content": questions[0]}]
    second_sent, _ = await turn(questions[1])
    assert second_sent == [
        {"role": "user", "content": questions[0]},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": questions[1]},
    ]
    await page.get_by_role("button", name="New chat").click()
    await expect(page.locator("article.turn")).to_have_count(0)
    third_sent, _ = await turn(questions[2])
    assert third_sent == [{"role": "user", "content": questions[2]}]
    assert errors.errors == []


async def test_compare_streams_both_answers_side_by_side(
    signed_in: BrowserContext, tiny_api: WebChatApi, tmp_path: Path
) -> None:
    page, errors = await open_page(signed_in)
    responses = []
    page.on(
        "response",
        lambda response: (
            responses.append(response) if response.url.endswith("/v1/chat/completions") else None
        ),
    )
    await page.goto(tiny_api.url)
    await page.get_by_label("Compare").check()
    await ask(page, "How do I learn to land switch?")
    ids = {variant: await answered(page, variant) for variant in ("base", "finetuned")}

    assert len(responses) == 2
    texts = {}
    for response in responses:
        model = json.loads(response.request.post_data)["model"]
        stream = await response.text()
        assert ids[model] in stream  # the column shows the answer of its own request
        texts[model] = streamed_text(stream)
        shown = await answer(page, model).locator(".body").text_content()
        assert as_shown(shown) == as_shown(texts[model]) != ""
    assert texts["base"] != texts["finetuned"]
    await expect(answer(page, "base").locator(".label")).to_have_text("Base")
    await expect(answer(page, "finetuned").locator(".label")).to_have_text("Finetuned")
    base = await answer(page, "base").bounding_box()
    finetuned = await answer(page, "finetuned").bounding_box()
    assert base["x"] + base["width"] <= finetuned["x"]  # two columns
    assert abs(base["y"] - finetuned["y"]) < 1

    # The vote reaches the server's feedback store, on the answers it recorded.
    await page.get_by_role("button", name="Finetuned is better").click()
    await expect(page.locator(".turn > .votes .vote-status")).to_have_text("Thanks, vote recorded.")
    with FeedbackStore(tiny_api.feedback_db) as store:
        (pair,) = store.pairs()
    assert (pair.base.answer_id, pair.finetuned.answer_id) == (ids["base"], ids["finetuned"])
    assert (pair.base.text, pair.finetuned.text) == (texts["base"], texts["finetuned"])
    assert pair.counts.finetuned == 1

    screenshot = tmp_path / "webchat-compare.png"
    await page.set_viewport_size({"width": 1000, "height": 460})  # the docs' picture, no blank
    await page.screenshot(path=str(screenshot))
    if os.environ.get("FREESKI_SCREENSHOT_DIR"):
        shutil.copy(screenshot, Path(os.environ["FREESKI_SCREENSHOT_DIR"]) / screenshot.name)
    assert errors.errors == []


# ---- the API over the scripted engine, in process ----------------------------------------


@contextlib.asynccontextmanager
async def scripted_api(
    engine: ScriptedEngine, *, feedback: ApiFeedback | None = None
) -> AsyncIterator[str]:
    await engine.start()
    async with serve_app(create_app(engine, ApiSettings(), feedback=feedback)) as url:
        yield url


async def ask(page: Page, question: str) -> None:
    await page.get_by_label("Your question").fill(question)
    await page.get_by_role("button", name="Send").click()


def answer(page: Page, variant: str, turn: int = -1):
    """The answer of ``variant`` in the ``turn``-th turn (default: the last)."""
    turns = page.locator("article.turn")
    return (turns.last if turn == -1 else turns.nth(turn)).locator(
        f'.answer[data-variant="{variant}"]'
    )


async def answered(page: Page, variant: str, turn: int = -1) -> str:
    """Wait for an answer to finish; its completion id."""
    slot = answer(page, variant, turn)
    await expect(slot).to_have_attribute("data-completion-id", re.compile(r"^chatcmpl-"))
    return await slot.get_attribute("data-completion-id")


XSS = (
    '<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> '
    "<svg/onload=window.__xss=3> **bold** _it_ `<b>code</b>` "
    "[site](https://example.com/page) [bad](javascript:window.__xss=4)"
)


async def test_html_in_an_answer_is_shown_as_text_and_never_runs(
    browser: Browser,
) -> None:
    # The page's own CSP would also stop inline scripts: bypass it, so only the
    # renderer stands between the model's text and the DOM.
    context = await browser.new_context(bypass_csp=True)
    dialogs: list[str] = []
    try:
        page, errors = await open_page(context)
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        async with scripted_api(ScriptedEngine()) as url:
            await page.goto(url)
            await page.get_by_label("Base", exact=True).check()
            await ask(page, XSS)
            await answered(page, "base")
            body = answer(page, "base").locator(".body")

            await page.wait_for_timeout(200)  # time for an onerror/onload to fire
            assert await page.evaluate("window.__xss") is None
            assert dialogs == []
            for tag in ("img", "script", "svg", "b"):
                assert await page.locator(f"#transcript {tag}").count() == 0, tag
            # The scripted base model repeats the question: the HTML came back through the model path.
            text = await body.text_content()
            assert '<img src=x onerror="window.__xss=1">' in text
            assert "<script>window.__xss=2</script>" in text
            assert "[bad](javascript:window.__xss=4)" in text
            # The Markdown subset is rendered, with DOM nodes.
            assert await body.locator("strong").text_content() == "bold"
            assert await body.locator("em").text_content() == "it"
            assert await body.locator("code").text_content() == "<b>code</b>"
            links = body.locator("a")
            assert await links.count() == 1
            assert await links.get_attribute("href") == "https://example.com/page"
            assert "noopener" in await links.get_attribute("rel")
            # The question is shown as typed, too.
            assert await page.locator(".question").text_content() == XSS
            assert errors.errors == []
    finally:
        await context.close()


async def test_failures_are_told_in_words_with_a_retry(context: BrowserContext) -> None:
    page, errors = await open_page(context)
    engine = ScriptedEngine()
    engine.failures = [EngineBusy(3.0), EngineTimeout("No answer within 120 s.")]
    async with scripted_api(engine) as url:
        await page.goto(url)
        await expect(page.locator("#token-form")).to_be_hidden()  # no API_TOKEN: no token asked
        await ask(page, "any good spring snow spots")
        slot = answer(page, "finetuned")
        await expect(slot.locator(".error")).to_have_text("The server is busy: try again in 3 s.")
        await slot.get_by_role("button", name="Retry").click()
        await expect(slot.locator(".error")).to_contain_text("No answer in time")
        await slot.get_by_role("button", name="Retry").click()
        await answered(page, "finetuned")
        await expect(slot.locator(".body")).to_have_text(
            "finetuned: spots snow spring good any end."
        )
    # The server is gone now.
    await ask(page, "still there")
    await expect(answer(page, "finetuned").locator(".error")).to_contain_text(
        "Cannot reach the server"
    )
    assert errors.errors == []


async def test_compare_fits_a_phone_screen(browser: Browser) -> None:
    context = await browser.new_context(viewport={"width": 375, "height": 700}, is_mobile=True)
    try:
        page, errors = await open_page(context)
        async with scripted_api(ScriptedEngine()) as url:
            await page.goto(url)
            await page.get_by_label("Compare").check()
            await ask(page, "which skis for a first season in the park")
            await answered(page, "base")
            await answered(page, "finetuned")
            base = await answer(page, "base").bounding_box()
            finetuned = await answer(page, "finetuned").bounding_box()
            assert base["y"] + base["height"] <= finetuned["y"]  # stacked, not squeezed
            assert base["width"] > 300
            assert await page.evaluate("document.documentElement.scrollWidth") <= 375
            send = await page.get_by_role("button", name="Send").bounding_box()
            assert send["x"] + send["width"] <= 375
            assert send["y"] + send["height"] <= 700
            assert errors.errors == []
    finally:
        await context.close()


async def test_votes_from_the_page_land_in_the_feedback_store(
    context: BrowserContext, tmp_path: Path
) -> None:
    page, errors = await open_page(context)
    store = await AsyncFeedbackStore.open(tmp_path / "feedback.sqlite")
    feedback = ApiFeedback(store, Provenance("scripted-base", AdapterRef(), {}))
    try:
        async with scripted_api(ScriptedEngine(), feedback=feedback) as url:
            await page.goto(url)
            await page.get_by_label("Compare").check()
            await ask(page, "fat skis for powder")
            ids = {variant: await answered(page, variant) for variant in ("base", "finetuned")}
            await answer(page, "base").get_by_role("button", name="Good answer").click()
            await answer(page, "finetuned").get_by_role("button", name="Bad answer").click()
            await answer(page, "finetuned").get_by_role("button", name="Good answer").click()
            await page.get_by_role("button", name="Base is better").click()
            statuses = page.locator(".vote-status")
            await expect(statuses).to_have_text(["Thanks, vote recorded."] * 3)
            pressed = page.locator('.vote[aria-pressed="true"]')
            await expect(pressed).to_have_count(3)  # the changed vote shows as changed

            base = await store.get_answer(ids["base"])
            finetuned = await store.get_answer(ids["finetuned"])
            assert (base.counts.up, base.counts.down) == (1, 0)
            assert (finetuned.counts.up, finetuned.counts.down) == (1, 0)  # one voter, one vote
            pair = await store.get_pair(base.pair_id)
            assert pair.finetuned.answer_id == ids["finetuned"]
            assert (pair.counts.base, pair.counts.finetuned) == (1, 0)
            assert base.conversation == [{"role": "user", "content": "fat skis for powder"}]
            # The votes came as this browser: the voter cookie the page got, out of its scripts' reach.
            (voter,) = [c for c in await context.cookies() if c["name"] == "freeski_voter"]
            assert (voter["httpOnly"], voter["sameSite"]) == (True, "Lax")
            assert "freeski_voter" not in await page.evaluate("document.cookie")
    finally:
        await store.close()
    assert errors.errors == []


async def test_a_browser_keeps_its_voter_id_when_it_follows_a_link_from_another_site(
    context: BrowserContext, tmp_path: Path
) -> None:
    """Arriving from a link elsewhere (a Discord message, a forum post) is the same browser."""
    page, errors = await open_page(context)
    store = await AsyncFeedbackStore.open(tmp_path / "feedback.sqlite")
    feedback = ApiFeedback(store, Provenance("scripted-base", AdapterRef(), {}))
    try:
        async with scripted_api(ScriptedEngine(), feedback=feedback) as url:
            elsewhere = web.Application()

            async def link(request: web.Request) -> web.Response:
                return web.Response(
                    text=f'<a href="{url}/">the ski chat</a>', content_type="text/html"
                )

            elsewhere.router.add_get("/", link)
            async with serve_app(elsewhere) as other:
                await page.goto(url)
                (first,) = [
                    c["value"] for c in await context.cookies() if c["name"] == "freeski_voter"
                ]
                await page.goto(other.replace("127.0.0.1", "localhost"))  # another site
                await page.get_by_role("link", name="the ski chat").click()
                await page.wait_for_url(f"{url}/")
                (then,) = [
                    c["value"] for c in await context.cookies() if c["name"] == "freeski_voter"
                ]
        assert then == first
    finally:
        await store.close()
    assert errors.errors == []


class BaseOnlyEngine(ScriptedEngine):
    """An engine without a finetuned adapter, as with ADAPTER_PATH unset."""

    def status(self) -> EngineStatus:
        return dataclasses.replace(super().status(), adapter=None)


async def test_without_an_adapter_only_the_base_model_is_offered(
    context: BrowserContext,
) -> None:
    page, errors = await open_page(context)
    engine = BaseOnlyEngine()
    async with scripted_api(engine) as url:
        await page.goto(url)
        await expect(page.get_by_label("Base", exact=True)).to_be_checked()
        await expect(page.get_by_label("Finetuned", exact=True)).to_be_disabled()
        await expect(page.get_by_label("Compare")).to_be_disabled()
        await ask(page, "first day on skis")
        await answered(page, "base")
    assert [variant for variant, *_ in engine.requests] == ["base"]
    assert errors.errors == []


async def test_with_several_adapters_a_picker_chooses_the_one_that_answers(
    context: BrowserContext, tmp_path: Path
) -> None:
    page, errors = await open_page(context)
    engine = ScriptedAdapters(["v1", "v2"], "v2")
    store = await AsyncFeedbackStore.open(tmp_path / "feedback.sqlite")
    feedback = ApiFeedback(store, Provenance("scripted-base", AdapterRef(), {}))
    try:
        async with scripted_api(engine, feedback=feedback) as url:
            await page.goto(url)
            picker = page.get_by_label("Adapter")
            await expect(picker).to_have_value("v2")  # the default, listed by /v1/models
            options = picker.locator("option")
            await expect(options).to_have_text(["v1", "v2 (default)"])
            await picker.select_option("v1")
            await page.get_by_label("Compare").check()
            await ask(page, "park or pipe")
            ids = {variant: await answered(page, variant) for variant in ("base", "finetuned")}
            await expect(answer(page, "finetuned").locator(".label")).to_have_text("v1")
            await expect(answer(page, "finetuned").locator(".body")).to_contain_text("v1:")
            await page.get_by_role("button", name="v1 is better").click()
            await expect(page.locator(".turn > .votes .vote-status")).to_have_text(
                "Thanks, vote recorded."
            )
            pair = await store.get_pair((await store.get_answer(ids["base"])).pair_id or "")
            assert (pair.a.variant, pair.b.variant) == ("base", "v1")
            assert pair.counts.b == 1
    finally:
        await store.close()
    assert [variant for variant, *_ in engine.requests][-2:] in (["base", "v1"], ["v1", "base"])
    assert errors.errors == []
