"""Several adapters on Discord: pick one by name, compare any two (blind or not), vote, manage them.

The bot runs against the loopback Discord over a scripted engine that serves
named adapters (each answer starts with the name of the model that wrote it,
so a test sees who answered) and records into a real SQLite store, read back
by the leaderboard as ``python -m bot feedback leaderboard`` reads it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from bot.discord_bot import admin
from bot.discord_bot.served import comparison
from bot.feedback.leaderboard import read_leaderboard
from bot.feedback.store import FeedbackStore
from bot.serving.adapters import ServedAdapter, ServedModels
from tests.discord_world import World, bot_settings, discord_world
from tests.fake_discord import ADMIN_ROLE_ID, FakeDiscord, custom_ids, user_payload
from tests.scripted_adapters import ScriptedAdapters, weights_of

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

ADMIN_ID = 930000000000000001
_user_ids = itertools.count(930000000000000100)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World[ScriptedAdapters]]:
    root = tmp_path_factory.mktemp("adapters-bot")
    settings = bot_settings(
        rate_limit_per_minute=0,
        feedback_db=root / "feedback.sqlite",
        admin_user_ids=(ADMIN_ID,),
        admin_role_ids=(ADMIN_ROLE_ID,),
    )
    engine = ScriptedAdapters(["v1", "v2"], "v2", step_s=0.001)
    async with discord_world(engine, settings) as world:
        yield world


def new_user(user_id: int | None = None) -> dict[str, Any]:
    user_id = user_id or next(_user_ids)
    return user_payload(user_id, f"skier{user_id % 1000}")


def store(world: World) -> FeedbackStore:
    assert world.settings.feedback_db is not None
    return FeedbackStore(world.settings.feedback_db)


async def final_response(fake: FakeDiscord, interaction: dict, *, buttons: bool = True) -> dict:
    """The interaction's response message once final (carrying its vote buttons, if asked)."""
    token = interaction["token"]
    return await fake.wait_for(
        lambda: next(
            (
                m
                for m in fake.messages.values()
                if m.get("interaction_token") == token and (custom_ids(m) or not buttons)
            ),
            None,
        )
    )


async def private_reply(fake: FakeDiscord, interaction: dict) -> str:
    """What the bot told the user privately: at once, or by editing a deferred response."""
    callback = await fake.wait_for(lambda: fake.callback_for(interaction))
    assert callback.body["data"]["flags"] & 64, "said privately"
    if callback.body["type"] == 4:
        return str(callback.body["data"]["content"])
    edited = await fake.wait_for(
        lambda: next(
            (
                m["content"]
                for m in fake.messages.values()
                if m.get("interaction_token") == interaction["token"] and m["content"]
            ),
            None,
        )
    )
    return str(edited)


async def vote(fake: FakeDiscord, message: dict, choice: str, user: dict) -> str:
    (custom_id,) = [c for c in custom_ids(message) if c.endswith(f":{choice}")]
    interaction = await fake.click(message["id"], custom_id, user=user)
    callback = await fake.wait_for(lambda: fake.callback_for(interaction))
    return str(callback.body["data"]["content"])


def fields(message: dict) -> dict[str, str]:
    return {f["name"]: f["value"] for f in message["embeds"][0]["fields"]}


async def test_model_options_autocomplete_the_served_names(world: World[ScriptedAdapters]):
    choices = await world.fake.autocomplete("ask", {"question": "Wax?", "model": ""}, "model")
    assert [(c["name"], c["value"]) for c in choices] == [
        ("base", "base"),
        ("finetuned (v2)", "finetuned"),
        ("v1", "v1"),
        ("v2", "v2"),
    ]
    choices = await world.fake.autocomplete("compare", {"question": "Wax?", "b": "v"}, "b")
    assert [c["value"] for c in choices] == ["v1", "v2"]


async def test_ask_answers_with_the_model_named_and_records_it_with_its_hash(
    world: World[ScriptedAdapters],
):
    interaction = await world.fake.slash_command("ask", {"question": "Best wax?", "model": "v1"})
    answer = await final_response(world.fake, interaction)
    assert answer["content"].startswith("v1: Best wax?")
    answer_id = custom_ids(answer)[0].split(":")[2]
    await vote(world.fake, answer, "up", new_user())  # lands after the record
    with store(world) as votes:
        recorded = votes.get_answer(answer_id)
    assert (recorded.variant, recorded.adapter.hash) == ("v1", weights_of("v1"))


async def test_a_model_not_served_is_refused_privately_naming_the_served_ones(
    world: World[ScriptedAdapters],
):
    asked = len(world.engine.requests)
    interaction = await world.fake.slash_command("ask", {"question": "Wax?", "model": "v9"})
    text = await private_reply(world.fake, interaction)
    assert "no model called `v9`" in text and "base, finetuned, v1, v2" in text
    interaction = await world.fake.slash_command(
        "compare", {"question": "Wax?", "a": "finetuned", "b": "v2"}
    )
    assert "both are v2" in await private_reply(world.fake, interaction)
    assert len(world.engine.requests) == asked, "nothing reached the engine"


async def test_compare_two_adapters_shows_them_by_name_and_counts_votes_per_adapter(
    world: World[ScriptedAdapters],
):
    question = "Rocker on ice?"
    interaction = await world.fake.slash_command(
        "compare", {"question": question, "a": "v1", "b": "v2"}
    )
    shown = await final_response(world.fake, interaction)
    assert fields(shown) == {"A: v1": f"v1: {question} end.", "B: v2": f"v2: {question} end."}
    for choice in ("b", "b", "a", "tie", "both_bad"):
        text = await vote(world.fake, shown, choice, new_user())
    assert "A was **v1**, B was **v2**" in text
    assert "A (v1) 1, B (v2) 2, tie 1, both bad 1" in text

    with store(world) as votes:
        board = read_leaderboard(votes)
    (v1_v2,) = [h for h in board.head_to_heads if {h.model.name, h.opponent.name} == {"v1", "v2"}]
    v2 = v1_v2 if v1_v2.model.name == "v2" else v1_v2.flipped()
    assert (v2.wins, v2.losses, v2.ties, v2.both_bad) == (2, 1, 1, 1)
    assert v2.model.weights == weights_of("v2") and v2.opponent.weights == weights_of("v1")
    assert "v2@" + weights_of("v2")[:8] in board.to_text()


async def test_blind_compare_labels_sides_a_and_b_and_the_vote_reveals_them(
    world: World[ScriptedAdapters],
):
    question = "Twin tips for park?"
    interaction = await world.fake.slash_command("compare", {"question": question, "blind": True})
    shown = await final_response(world.fake, interaction)
    texts = fields(shown)
    assert list(texts) == ["A", "B"], "no model named above the answers"
    text = await vote(world.fake, shown, "a", new_user())
    pair_id = custom_ids(shown)[0].split(":")[2]
    with store(world) as votes:
        pair = votes.get_pair(pair_id)
    assert {pair.a.variant, pair.b.variant} == {"base", "v2"}, "base vs the default adapter"
    assert (pair.a.text, pair.b.text) == (texts["A"], texts["B"]), "recorded as shown"
    assert f"A was **{pair.a.variant}**, B was **{pair.b.variant}**" in text
    assert pair.counts.a == 1


async def test_blind_sides_come_in_either_order() -> None:
    served = ServedModels((ServedAdapter("v2", "runs/v2"),), "v2")
    sides = [
        comparison(served, "base", "finetuned", blind=True, rng=random.Random(seed))
        for seed in range(20)
    ]
    assert {s.names for s in sides if not isinstance(s, str)} == {
        ("base", "finetuned"),
        ("finetuned", "base"),
    }
    assert {s.labels for s in sides if not isinstance(s, str)} == {("A", "B")}
    plain = comparison(served, "base", "finetuned", blind=False)
    assert not isinstance(plain, str) and plain.names == ("base", "finetuned")


async def test_adapters_is_for_admins_only_and_loads_unloads_and_promotes(
    world: World[ScriptedAdapters],
):
    stranger = await world.fake.slash_command("adapters list", user=new_user())
    assert await private_reply(world.fake, stranger) == admin.REFUSAL
    refused = await world.fake.slash_command(
        "adapters load", {"name": "v3", "path": "runs/v3"}, user=new_user()
    )
    assert await private_reply(world.fake, refused) == admin.REFUSAL
    assert "v3" not in world.engine.models().names

    by_id = new_user(ADMIN_ID)
    loaded = await world.fake.slash_command(
        "adapters load", {"name": "v3", "path": "runs/v3"}, user=by_id
    )
    assert (await private_reply(world.fake, loaded)).startswith("Loaded `v3`")
    choices = await world.fake.autocomplete("ask", {"question": "?", "model": "v"}, "model")
    assert [c["value"] for c in choices] == ["v1", "v2", "v3"]

    by_role = new_user()
    promoted = await world.fake.slash_command(
        "adapters promote", {"name": "v3"}, user=by_role, roles=[ADMIN_ROLE_ID]
    )
    assert (await private_reply(world.fake, promoted)).startswith("`v3` now answers")
    asked = await world.fake.user_says("Which boots?", author=new_user())
    reply = await world.fake.wait_for(
        lambda: next(
            (
                m
                for m in world.fake.bot_messages()
                if (m.get("message_reference") or {}).get("message_id") == asked["id"]
                and custom_ids(m)
            ),
            None,
        )
    )
    assert reply["content"].startswith("v3: Which boots?"), "a mention asks the default"

    refused = await world.fake.slash_command("adapters unload", {"name": "v3"}, user=by_id)
    assert "default" in await private_reply(world.fake, refused)
    unloaded = await world.fake.slash_command("adapters unload", {"name": "v1"}, user=by_id)
    assert await private_reply(world.fake, unloaded) == "Unloaded `v1`."
    listed = await world.fake.slash_command("adapters list", user=by_id)
    text = await private_reply(world.fake, listed)
    assert text.splitlines()[0].startswith("v2 · weights")
    assert text.splitlines()[1].startswith("**v3** (default, `finetuned`)")
    promoted = await world.fake.slash_command("adapters promote", {"name": "v2"}, user=by_id)
    assert (await private_reply(world.fake, promoted)).startswith("`v2` now answers")


async def test_status_lists_the_adapters_and_each_ones_results_against_base(
    world: World[ScriptedAdapters],
):
    interaction = await world.fake.slash_command("compare", {"question": "Pow skis?"})
    shown = await final_response(world.fake, interaction)
    for choice in ("b", "b", "a"):  # not blind by default: A is base, B is the default (v2)
        await vote(world.fake, shown, choice, new_user())
    status = await world.fake.slash_command("status")
    rows = fields(await final_response(world.fake, status, buttons=False))
    assert rows["Adapters"] == f"v2 `{weights_of('v2')[:8]}` (default), v3 `{weights_of('v3')[:8]}`"
    # these three, and the blind vote above (its sides in a random order)
    assert rows["Vs base"].startswith(f"v2@{weights_of('v2')[:8]}: ")
    assert "% of 4 votes (95% " in rows["Vs base"]
