"""Sources under the bot's answers, end to end: loopback Discord, a grounded scripted engine.

The engine answers from the bundled sample forum's store (``forum_store``);
votes go to a real feedback store, which must record the sources shown.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from bot.discord_bot.messages import SOURCES_MARK
from bot.feedback.store import FeedbackStore
from bot.serving.grounding import GroundedEngine
from bot.serving.metrics import CountedEngine
from bot.serving.settings import EngineSettings
from crawl.search import Passage, Retriever
from tests.discord_world import World, bot_settings, discord_world
from tests.fake_discord import FakeDiscord, custom_ids, final_comparison, user_payload
from tests.scripted_engine import ScriptedEngine

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

QUESTION = "What do I need for waxing my skis at home?"
_user_ids = itertools.count(950000000000000000)


@pytest.fixture(scope="module")
def passages(forum_store) -> list[Passage]:
    """What the engine's retriever finds for :data:`QUESTION`: the sources an answer must show."""
    with Retriever.open(forum_store) as retriever:
        return retriever.search(QUESTION, 3)


@pytest.fixture(scope="module")
def inner() -> ScriptedEngine:
    """The engine under the grounding: it sees the passages in the conversation it is given."""
    return ScriptedEngine(step_s=0.001, max_new_tokens=1000)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(
    forum_store, inner: ScriptedEngine, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    settings = bot_settings(
        engine=EngineSettings(base_model="tiny-base"),
        rate_limit_per_minute=0,
        max_question_chars=5000,
        feedback_db=tmp_path_factory.mktemp("grounded-bot") / "feedback.sqlite",
    )
    engine = CountedEngine(GroundedEngine(inner, forum_store, 3))
    async with discord_world(engine, settings) as world:
        yield world


def new_user() -> dict[str, Any]:
    user_id = next(_user_ids)
    return user_payload(user_id, f"reader{user_id % 1000}")


async def last_part(fake: FakeDiscord, message_id: str) -> list[dict]:
    """The bot's answer to ``message_id``, every part, once the last (with the buttons) is sent."""
    parts: list[dict] = []
    parent = message_id
    while True:

        def reply(parent: str = parent) -> dict | None:
            for message in fake.bot_messages():
                reference = message.get("message_reference") or {}
                if reference.get("message_id") == parent and not message["content"].endswith("…"):
                    return message
            return None

        parts.append(await fake.wait_for(reply))
        if custom_ids(parts[-1]):
            return parts
        parent = parts[-1]["id"]


async def recorded(world: World, question: str, timeout_s: float = 10.0) -> list:
    """The feedback store's answers to ``question``, once the bot has recorded one.

    The record is written beside the reply, not before it: on a busy machine the
    reply can reach Discord first.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        with FeedbackStore(world.settings.feedback_db) as store:  # type: ignore[arg-type]
            found = [a for a in store.answers() if a.conversation[-1]["content"] == question]
        if found or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.05)


def sources_of(content: str) -> list[str]:
    """The links of a sources block, in order."""
    _, mark, block = content.partition(SOURCES_MARK)
    assert mark, content
    return re.findall(r"\]\(<([^>]+)>\)", block)


async def test_a_mention_shows_up_to_three_sources_as_unembedded_links(
    world: World, passages: list[Passage]
):
    asked = await world.fake.user_says(QUESTION, author=new_user())
    (reply,) = await last_part(world.fake, asked["id"])
    assert len(reply["content"]) <= 2000
    assert sources_of(reply["content"]) == [p.url for p in passages]
    assert f"[{passages[0].title.split(' - ')[0]}" in reply["content"]
    assert passages[0].excerpt.split()[0] in reply["content"]  # the quoted excerpt
    assert reply["sent_allowed_mentions"] == {"parse": []}
    (answer,) = await recorded(world, QUESTION)
    assert [s["post_id"] for s in answer.sources] == [p.post_id for p in passages]


async def test_a_reply_continues_without_the_sources_in_the_conversation(
    world: World, inner: ScriptedEngine
):
    user = new_user()
    asked = await world.fake.user_says(QUESTION, author=user)
    (answer,) = await last_part(world.fake, asked["id"])
    follow_up = await world.fake.user_says(
        "and how long to cool?", mention_bot=False, reply_to=int(answer["id"]), author=user
    )
    await last_part(world.fake, follow_up["id"])
    _, messages, _ = inner.requests[-1]
    assert messages[1]["role"] == "assistant" and SOURCES_MARK not in messages[1]["content"]
    assert messages[1]["content"] == answer["content"].partition(SOURCES_MARK)[0].strip()
    assert "Forum posts that may help:" in messages[-1]["content"]  # the follow-up found them


async def test_a_long_answer_keeps_its_sources_in_the_last_part(world: World):
    question = QUESTION + " " + " ".join(f"wax{i}" for i in range(300))  # the answer echoes it
    asked = await world.fake.user_says(question, author=new_user())
    parts = await last_part(world.fake, asked["id"])
    assert len(parts) >= 2 and all(len(p["content"]) <= 2000 for p in parts)
    assert all(SOURCES_MARK not in p["content"] for p in parts[:-1])
    assert sources_of(parts[-1]["content"])


async def test_compare_shows_the_sources_once(world: World, passages: list[Passage]):
    interaction = await world.fake.slash_command("compare", {"question": QUESTION})
    shown = await world.fake.wait_for(lambda: final_comparison(world.fake, interaction["token"]))
    assert shown["content"].count(SOURCES_MARK) == 1
    assert sources_of(shown["content"]) == [p.url for p in passages]
    assert all(SOURCES_MARK not in f["value"] for f in shown["embeds"][0]["fields"])


async def test_status_says_grounding_is_on(world: World):
    interaction = await world.fake.slash_command("status")
    message = await world.fake.wait_for(
        lambda: next(
            (
                m
                for m in world.fake.messages.values()
                if m.get("interaction_token") == interaction["token"]
            ),
            None,
        )
    )
    fields = {f["name"]: f["value"] for f in message["embeds"][0]["fields"]}
    assert fields["Grounding"].startswith("on: ") and "k=3" in fields["Grounding"]
