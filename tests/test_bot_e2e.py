"""The bot end to end against a loopback Discord, answering with a scripted engine.

One fake Discord and one connected bot serve the whole module (connecting
costs discord.py's two-second wait for guilds); each test speaks as its own
user so per-user rate limits do not leak between tests. The last test shuts
the bot down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from bot.discord_bot.commands import SORRY
from bot.discord_bot.replies import STREAMING_MARK
from tests.discord_world import World, bot_settings, discord_world
from tests.fake_discord import (
    GUILD_ID,
    OTHER_CHANNEL_ID,
    FakeDiscord,
    final_comparison,
    user_payload,
)
from tests.scripted_engine import ScriptedEngine, scripted_words

SIDES = (("A", "base"), ("B", "finetuned"))  # /compare's default sides, not blind
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

RATE_LIMIT = 3
_user_ids = itertools.count(930000000000000000)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world() -> AsyncIterator[World[ScriptedEngine]]:
    engine = ScriptedEngine(step_s=0.002, max_new_tokens=1000)
    settings = bot_settings(rate_limit_per_minute=RATE_LIMIT, max_question_chars=5000)
    async with discord_world(engine, settings) as world:
        yield world


def new_user() -> dict[str, Any]:
    user_id = next(_user_ids)
    return user_payload(user_id, f"skier{user_id % 1000}")


def expected_answer(question: str, variant: str = "finetuned") -> str:
    return " ".join(scripted_words([{"role": "user", "content": question}], variant))


async def final_reply_to(fake: FakeDiscord, message_id: str, timeout: float = 10) -> dict:
    """The bot's reply to ``message_id`` once its streaming preview has been replaced."""

    def done() -> dict | None:
        for message in fake.bot_messages():
            reference = message.get("message_reference") or {}
            if reference.get("message_id") == message_id and not message["content"].endswith(" …"):
                return message
        return None

    return await fake.wait_for(done, timeout)


async def test_commands_are_registered_in_the_guild_only(world: World):
    names = {c["name"] for c in world.fake.commands[f"guild:{GUILD_ID}"]}
    assert names == {"adapters", "ask", "compare", "status"}
    assert "global" not in world.fake.commands, "a guild and a global sync show commands twice"
    compare = next(c for c in world.fake.commands[f"guild:{GUILD_ID}"] if c["name"] == "compare")
    options = {o["name"]: o for o in compare["options"]}
    assert list(options) == ["question", "a", "b", "blind"]
    assert options["a"]["autocomplete"] and options["b"]["autocomplete"]
    ask = next(c for c in world.fake.commands[f"guild:{GUILD_ID}"] if c["name"] == "ask")
    assert [(o["name"], o.get("autocomplete")) for o in ask["options"]][1] == ("model", True)


async def test_a_mention_is_answered_in_a_streamed_reply(world: World):
    question = "What wax for really cold snow?"
    asked = await world.fake.user_says(question, author=new_user())
    reply = await final_reply_to(world.fake, asked["id"])
    assert reply["content"] == expected_answer(question)
    assert world.fake.calls_to("POST", "/typing"), "the user should see the bot typing"
    assert reply["sent_allowed_mentions"] == {"parse": []}


async def test_a_reply_to_an_answer_continues_the_conversation(world: World):
    user = new_user()
    first = await world.fake.user_says("Which skis for park?", author=user)
    answer = await final_reply_to(world.fake, first["id"])
    follow_up = await world.fake.user_says(
        "And for powder days?", mention_bot=False, reply_to=int(answer["id"]), author=user
    )
    await final_reply_to(world.fake, follow_up["id"])
    variant, messages, _ = world.engine.requests[-1]
    assert variant == "finetuned"
    assert messages == [
        {"role": "user", "content": "Which skis for park?"},
        {"role": "assistant", "content": answer["content"]},
        {"role": "user", "content": "And for powder days?"},
    ]


async def test_compare_defers_then_shows_both_variants(world: World):
    question = "Is rocker good on ice?"
    interaction = await world.fake.slash_command("compare", {"question": question})
    token = interaction["token"]
    original = await world.fake.wait_for(lambda: final_comparison(world.fake, token))
    callback = world.fake.calls_to("POST", f"/interactions/{interaction['id']}/")[0]
    assert callback.body["type"] == 5, "the first response must be a deferral"
    fields = {f["name"]: f["value"] for f in original["embeds"][0]["fields"]}
    assert fields == {
        "A: base": expected_answer(question, "base"),
        "B: finetuned": expected_answer(question, "finetuned"),
    }


async def test_compare_streams_both_answers_live_into_its_embed(world: World):
    question = " ".join(f"is rocker{i} good on ice" for i in range(12))  # 60 words, ~0.15 s
    interaction = await world.fake.slash_command("compare", {"question": question})
    token = interaction["token"]
    await world.fake.wait_for(lambda: final_comparison(world.fake, token))
    edits = [
        call.body["embeds"][0]
        for call in world.fake.calls_to("PATCH", f"/{token}/messages/@original")
        if call.body and call.body.get("embeds")
    ]
    previews, final = edits[:-1], edits[-1]
    assert previews, "the answers appeared only at the end"
    expected = {f"{side}: {v}": expected_answer(question, v) for side, v in SIDES}
    for preview in previews:
        assert preview["title"] == final["title"]
        for field in preview["fields"]:
            assert field["value"].endswith(STREAMING_MARK.strip())
            written = field["value"].removesuffix(STREAMING_MARK.strip()).strip()
            assert expected[field["name"]].startswith(written)
    assert any(f["value"] != STREAMING_MARK.strip() for p in previews for f in p["fields"]), (
        "no preview showed any text"
    )
    assert {f["name"]: f["value"] for f in final["fields"]} == expected


async def test_ask_streams_the_chosen_variant(world: World):
    interaction = await world.fake.slash_command(
        "ask", {"question": "Best goggles?", "model": "base"}
    )
    token = interaction["token"]
    want = expected_answer("Best goggles?", "base")
    await world.fake.wait_for(
        lambda: any(
            m.get("interaction_token") == token and m["content"] == want
            for m in world.fake.messages.values()
        )
    )


async def test_an_answer_over_2000_characters_arrives_split(world: World):
    question = " ".join(f"powder{i}" for i in range(400))  # the scripted answer echoes it
    asked = await world.fake.user_says(question, author=new_user())
    first = await final_reply_to(world.fake, asked["id"])
    parts = [first]
    while len(" ".join(p["content"] for p in parts)) < len(expected_answer(question)):
        parts.append(await final_reply_to(world.fake, parts[-1]["id"]))
    assert len(parts) >= 2
    assert all(len(p["content"]) <= 2000 for p in parts)
    assert " ".join(p["content"] for p in parts).split() == expected_answer(question).split()


async def test_model_output_with_everyone_is_sent_with_mentions_disabled(world: World):
    asked = await world.fake.user_says("tell @everyone <@&123> hello", author=new_user())
    reply = await final_reply_to(world.fake, asked["id"])
    assert "@everyone" in reply["content"]
    sends = [
        c
        for c in world.fake.calls
        if c.method in {"POST", "PATCH"} and c.body and "@everyone" in (c.body.get("content") or "")
    ]
    assert sends
    assert all(c.body["allowed_mentions"] == {"parse": []} for c in sends)


async def test_a_429_from_discord_is_retried(world: World):
    world.fake.rate_limit_next["POST /channels/"] = 1
    asked = await world.fake.user_says("Do I need a helmet?", author=new_user())
    reply = await final_reply_to(world.fake, asked["id"])
    assert reply["content"] == expected_answer("Do I need a helmet?")
    assert world.fake.rate_limit_next["POST /channels/"] == 0, "the 429 was never served"


async def test_the_per_user_rate_limit_answers_politely(world: World):
    user = new_user()
    for i in range(RATE_LIMIT):
        asked = await world.fake.user_says(f"question {i}?", author=user)
        await final_reply_to(world.fake, asked["id"])
    asked = await world.fake.user_says("one more?", author=user)
    reply = await final_reply_to(world.fake, asked["id"])
    assert "questions a minute" in reply["content"]
    assert all(m[-1]["content"] != "one more?" for _, m, _ in world.engine.requests)


async def test_status_shows_the_engine(world: World):
    interaction = await world.fake.slash_command("status")
    token = interaction["token"]
    message = await world.fake.wait_for(
        lambda: next(
            (m for m in world.fake.messages.values() if m.get("interaction_token") == token), None
        )
    )
    fields = {f["name"]: f["value"] for f in message["embeds"][0]["fields"]}
    assert fields["Model"] == "scripted-base"
    assert message["flags"] & 64, "status is shown to the asker only"


@pytest.mark.parametrize(
    ("allow", "refusal"),
    [
        ({"allowed_channel_ids": (OTHER_CHANNEL_ID,)}, f"I only answer in <#{OTHER_CHANNEL_ID}>."),
        ({"allowed_role_ids": (900000000000000077,)}, "only members with one of the bot's allowed"),
    ],
)
async def test_status_obeys_the_allow_lists(
    world: World, allow: dict[str, tuple[int, ...]], refusal: str
):
    cog = world.bot.get_cog("AnswerCog")
    settings = cog.settings
    cog.settings = dataclasses.replace(settings, **allow)
    try:
        interaction = await world.fake.slash_command("status", user=new_user())
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
    finally:
        cog.settings = settings
    assert refusal in message["content"]
    assert message["embeds"] == [], "no model, adapter or queue for those the lists keep out"
    assert message["flags"] & 64


async def test_a_failing_answer_tells_the_user_and_the_bot_lives_on(world: World):
    user = new_user()
    world.engine.failures.append(RuntimeError("the GPU caught fire"))
    asked = await world.fake.user_says("Why is my wax flaking?", author=user)
    reply = await final_reply_to(world.fake, asked["id"])
    assert reply["content"] == SORRY
    asked = await world.fake.user_says("And now?", author=user)
    reply = await final_reply_to(world.fake, asked["id"])
    assert reply["content"] == expected_answer("And now?")


async def test_deleting_the_question_stops_its_answer(world: World):
    world.engine.step_s = 0.1
    world.engine.was_cancelled.clear()
    try:
        asked = await world.fake.user_says("a b c d e f g h i j k l m n o p", author=new_user())
        await world.fake.wait_for(
            lambda: any(
                (m.get("message_reference") or {}).get("message_id") == asked["id"]
                for m in world.fake.bot_messages()
            )
        )
        await world.fake.delete_message(int(asked["id"]))
        await asyncio.wait_for(world.engine.was_cancelled.wait(), 5)
        await world.fake.wait_for(
            lambda: (
                not any(
                    (m.get("message_reference") or {}).get("message_id") == asked["id"]
                    for m in world.fake.bot_messages()
                )
            )
        )
    finally:
        world.engine.step_s = 0.002


async def test_shutdown_lets_the_running_answer_finish(world: World):
    """Runs last in this module: it closes the shared bot."""
    world.engine.step_s = 0.05
    question = "one two three four five six seven eight"
    asked = await world.fake.user_says(question, author=new_user())
    await world.fake.wait_for(
        lambda: any(
            (m.get("message_reference") or {}).get("message_id") == asked["id"]
            for m in world.fake.bot_messages()
        )
    )
    cancelled_before = world.engine.cancelled
    await asyncio.wait_for(world.bot.close(), 15)
    reply = await final_reply_to(world.fake, asked["id"], timeout=1)
    assert reply["content"] == expected_answer(question)
    assert world.engine.cancelled == cancelled_before
    assert world.bot.is_closed()
