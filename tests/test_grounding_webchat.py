"""The web chat shows a grounded answer's sources as links, in a real browser (headless Chromium).

The API runs in process over a grounded scripted engine and the sample
forum's store; the test skips, saying so, where no Chromium is installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import expect

from bot.api.feedback import ApiFeedback
from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.feedback.aio import AsyncFeedbackStore
from bot.feedback.provenance import Provenance
from bot.feedback.records import AdapterRef
from bot.serving.grounding import GroundedEngine
from bot.serving.metrics import CountedEngine
from crawl.search import Retriever
from tests.browser import chromium, open_page
from tests.loopback import serve_app
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(120)

QUESTION = "What do I need for waxing my skis at home?"


async def test_the_answer_lists_its_sources_as_links_and_the_vote_records_them(
    forum_store: Path, tmp_path: Path
) -> None:
    with Retriever.open(forum_store) as retriever:
        passages = retriever.search(QUESTION, 3)
    engine = CountedEngine(GroundedEngine(ScriptedEngine(), forum_store, 3))
    await engine.start()
    store = await AsyncFeedbackStore.open(tmp_path / "feedback.sqlite")
    feedback = ApiFeedback(store, Provenance("scripted-base", AdapterRef(), {}))
    try:
        async with (
            chromium() as browser,
            serve_app(create_app(engine, ApiSettings(), feedback=feedback)) as url,
        ):
            context = await browser.new_context()
            page, errors = await open_page(context)
            await page.goto(url)
            await page.get_by_label("Your question").fill(QUESTION)
            await page.get_by_role("button", name="Send").click()
            sources = page.get_by_role("list", name="Sources")
            links = sources.get_by_role("link")
            await expect(links).to_have_count(len(passages))
            await expect(links).to_have_text([p.title for p in passages])
            assert [await link.get_attribute("href") for link in await links.all()] == [
                p.url for p in passages
            ]
            await expect(sources.locator(".excerpt").first).to_have_text(passages[0].excerpt)
            answer_id = await page.locator(".answer").first.get_attribute("data-completion-id")
            await page.get_by_role("button", name="Good answer").click()
            await expect(page.locator(".vote-status")).to_have_text("Thanks, vote recorded.")
            recorded = await store.get_answer(answer_id)  # type: ignore[arg-type]
            await context.close()
    finally:
        await store.close()
        await engine.close()
    assert [s["url"] for s in recorded.sources] == [p.url for p in passages]
    assert recorded.counts.up == 1
    assert errors.errors == []
