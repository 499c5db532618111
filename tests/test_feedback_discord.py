"""Vote buttons end to end: the bot against the loopback Discord, votes in a real SQLite store.

One fake Discord serves the module; the bot is started, restarted (the
buttons must keep working) and closed by the tests in order.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.discord_bot import feedback_views
from bot.feedback.ids import adapter_weights_hash
from bot.feedback.records import AdapterRef, AnswerCounts, PairCounts
from bot.feedback.store import FeedbackStore
from bot.serving.settings import EngineSettings
from tests.discord_world import World, bot_settings, discord_world
from tests.fake_discord import BOT_ID, FakeDiscord, custom_ids, user_payload
from tests.scripted_engine import ScriptedEngine

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

DISCORD_ACK_DEADLINE_S = 3.0
PAIR = ["a", "b", "tie", "both_bad"]
_user_ids = itertools.count(940000000000000000)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World[ScriptedEngine]]:
    root = tmp_path_factory.mktemp("feedback-bot")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"the SFT adapter's weights")
    settings = bot_settings(
        engine=EngineSettings(base_model="tiny-base", adapter_path=adapter),
        rate_limit_per_minute=0,
        max_question_chars=5000,
        feedback_db=root / "votes" / "feedback.sqlite",
    )
    async with discord_world(ScriptedEngine(step_s=0.002, max_new_tokens=1000), settings) as world:
        yield world


def votes(world: World) -> FeedbackStore:
    """A second, independent connection to the bot's store: what another process would read."""
    assert world.settings.feedback_db is not None
    return FeedbackStore(world.settings.feedback_db)


def new_user() -> dict[str, Any]:
    user_id = next(_user_ids)
    return user_payload(user_id, f"voter{user_id % 1000}")


async def answered(fake: FakeDiscord, message_id: str) -> dict:
    """The bot's final reply to ``message_id``: the one that carries the buttons."""

    def done() -> dict | None:
        for message in fake.bot_messages():
            reference = message.get("message_reference") or {}
            if reference.get("message_id") == message_id and custom_ids(message):
                return message
        return None

    return await fake.wait_for(done)


async def click(fake: FakeDiscord, message: dict, custom_id: str, user: dict) -> tuple[Any, str]:
    """Click and wait for the acknowledgement; returns (callback call, text shown to the user)."""
    interaction = await fake.click(message["id"], custom_id, user=user)
    clicked_at = fake.calls[-1].at if fake.calls else 0.0
    callback = await fake.wait_for(lambda: fake.callback_for(interaction))
    assert callback.at - clicked_at < DISCORD_ACK_DEADLINE_S
    data = callback.body.get("data") or {}
    if callback.body["type"] == 5:  # deferred: the text comes as a followup
        followup = await fake.wait_for(lambda: fake.followups_for(interaction))
        return callback, followup[0]["content"]
    return callback, data.get("content", "")


def rate_ids(message: dict) -> dict[str, str]:
    return {cid.rsplit(":", 1)[1]: cid for cid in custom_ids(message)}


async def test_a_mention_answer_carries_thumbs_buttons(world: World):
    asked = await world.fake.user_says("What wax for cold snow?", author=new_user())
    reply = await answered(world.fake, asked["id"])
    ids = custom_ids(reply)
    assert len(ids) == 2
    assert ids[0].startswith("fb:a:") and ids[0].endswith(":up")
    assert ids[1] == ids[0][: -len("up")] + "down"
    assert reply["sent_allowed_mentions"] == {"parse": []}


async def test_ask_and_long_answers_carry_the_buttons_under_their_last_part(world: World):
    interaction = await world.fake.slash_command("ask", {"question": "Best goggles?"})
    token = interaction["token"]
    asked = await world.fake.wait_for(
        lambda: next(
            (
                m
                for m in world.fake.messages.values()
                if m.get("interaction_token") == token and custom_ids(m)
            ),
            None,
        )
    )
    assert [cid.rsplit(":", 1)[1] for cid in custom_ids(asked)] == ["up", "down"]

    question = " ".join(f"powder{i}" for i in range(400))  # the scripted answer echoes it
    message = await world.fake.user_says(question, author=new_user())
    parts = [await answered_part(world.fake, message["id"])]
    while not custom_ids(parts[-1]):
        parts.append(await answered_part(world.fake, parts[-1]["id"]))
    assert len(parts) >= 2, "the answer was long enough to be split"
    assert all(not custom_ids(p) for p in parts[:-1])


async def answered_part(fake: FakeDiscord, message_id: str) -> dict:
    def done() -> dict | None:
        for message in fake.bot_messages():
            reference = message.get("message_reference") or {}
            if reference.get("message_id") == message_id and not message["content"].endswith(" …"):
                return message
        return None

    return await fake.wait_for(done)


async def test_a_click_is_acknowledged_privately_in_time_and_stored_hashed(world: World):
    asked = await world.fake.user_says("Which skis for park?", author=new_user())
    reply = await answered(world.fake, asked["id"])
    buttons = rate_ids(reply)
    voter = new_user()
    callback, text = await click(world.fake, reply, buttons["up"], voter)
    assert callback.body["type"] == 4
    assert callback.body["data"]["flags"] & 64, "the thanks is shown to the voter only"
    assert callback.body["data"]["allowed_mentions"] == {"parse": []}
    assert text.startswith("Thanks, counted 👍") and "1 👍 and 0 👎" in text

    _, text = await click(world.fake, reply, buttons["down"], voter)
    assert text.startswith("Changed your vote to 👎") and "0 👍 and 1 👎" in text
    _, text = await click(world.fake, reply, buttons["up"], new_user())
    assert "1 👍 and 1 👎" in text

    answer_id = buttons["up"].split(":")[2]
    with votes(world) as store:
        stored = store.get_answer(answer_id)
        assert stored.counts == AnswerCounts(up=1, down=1)
        assert stored.text == reply["content"]
        assert stored.conversation == [{"role": "user", "content": "Which skis for park?"}]
        assert (stored.source, stored.variant, stored.model) == (
            "discord",
            "finetuned",
            "tiny-base",
        )
        assert stored.adapter.hash == adapter_weights_hash(world.settings.engine.adapter_path)
        assert stored.settings["temperature"] == world.settings.engine.temperature
    with sqlite3.connect(world.settings.feedback_db) as db:
        voters = [row[0] for row in db.execute("SELECT voter FROM answer_votes")]
    assert voter["id"] not in " ".join(voters)


async def test_compare_carries_preference_buttons_and_status_shows_the_win_rate(world: World):
    interaction = await world.fake.slash_command("compare", {"question": "Is rocker good on ice?"})
    token = interaction["token"]
    message = await world.fake.wait_for(
        lambda: next(
            (
                m
                for m in world.fake.messages.values()
                if m.get("interaction_token") == token and custom_ids(m)
            ),
            None,
        )
    )
    ids = custom_ids(message)
    assert [cid.rsplit(":", 1)[1] for cid in ids] == ["a", "b", "tie", "both_bad"]
    assert len({cid.split(":")[2] for cid in ids}) == 1, "one pair id on all four"
    labels = [c["label"] for row in message["components"] for c in row["components"]]
    assert labels == ["A is better", "B is better", "Tie", "Both bad"]
    shown = [f["name"] for f in message["embeds"][0]["fields"]]
    assert shown == ["A: base", "B: finetuned"], "not blind: each side under its model's name"

    voters = [new_user() for _ in range(4)]
    for choice, voter in zip(("b", "b", "a", "both_bad"), voters, strict=True):
        _, text = await click(world.fake, message, ids[PAIR.index(choice)], voter)
        assert text.startswith("Thanks, counted")
    assert "A was **base**, B was **finetuned**" in text
    assert "A (base) 1, B (finetuned) 2, tie 0, both bad 1" in text

    pair_id = ids[0].split(":")[2]
    # A button of a pair shown before sides existed names its model: it counts as that side.
    legacy = f"fb:p:{pair_id}:finetuned"
    message["components"][0]["components"].append(
        {"type": 2, "style": 2, "label": "Finetuned is better", "custom_id": legacy}
    )
    _, text = await click(world.fake, message, legacy, voters[0])
    assert text.startswith("Already counted “Finetuned is better”")
    with votes(world) as store:
        pair = store.get_pair(pair_id)
        assert pair.counts == PairCounts(base=1, finetuned=2, both_bad=1)
        assert pair.base.text.startswith("base:") and pair.finetuned.text.startswith("finetuned:")

    status = await world.fake.slash_command("status")
    shown = await world.fake.wait_for(
        lambda: next(
            (
                m
                for m in world.fake.messages.values()
                if m.get("interaction_token") == status["token"]
            ),
            None,
        )
    )
    fields = {f["name"]: f["value"] for f in shown["embeds"][0]["fields"]}
    hash_ = adapter_weights_hash(world.settings.engine.adapter_path)[:8]
    assert fields["Vs base"].startswith(f"finetuned@{hash_}: 67% of 3 votes (95% ")
    assert fields["Votes"].splitlines()[0].startswith("base: 0 👍 / 0 👎")
    assert fields["Votes"].splitlines()[1].startswith(f"finetuned@{hash_}: 1 👍 / 1 👎")


async def test_an_unknown_answer_gets_a_polite_private_note(world: World):
    message = world.fake._message(
        int(world.fake.messages[next(iter(world.fake.messages))]["channel_id"]),
        world.fake.bot_user,
        "an answer from a wiped store",
    )
    message["components"] = [
        {
            "type": 1,
            "components": [
                {"type": 2, "style": 2, "label": "👍", "custom_id": "fb:a:a-forgotten:up"}
            ],
        }
    ]
    world.fake.messages[int(message["id"])] = message
    callback, text = await click(world.fake, message, "fb:a:a-forgotten:up", new_user())
    assert text == feedback_views.GONE
    assert callback.body["data"]["flags"] & 64


async def test_a_slow_store_is_deferred_then_followed_up(world: World, monkeypatch):
    asked = await world.fake.user_says("Do I need a helmet?", author=new_user())
    reply = await answered(world.fake, asked["id"])
    monkeypatch.setattr(feedback_views, "ACK_BUDGET_S", 0.0)  # every write counts as slow
    callback, text = await click(world.fake, reply, rate_ids(reply)["up"], new_user())
    assert callback.body["type"] == 5 and callback.body["data"]["flags"] & 64
    assert text.startswith("Thanks, counted 👍")


async def test_votes_survive_a_restart_and_stay_one_per_user(world: World):
    voter = new_user()
    asked = await world.fake.user_says("Best goggles for flat light?", author=new_user())
    reply = await answered(world.fake, asked["id"])
    buttons = rate_ids(reply)
    _, text = await click(world.fake, reply, buttons["up"], voter)
    assert text.startswith("Thanks, counted")

    await world.stop_bot()
    await world.start_bot()  # a new process would see the same: nothing kept in memory

    _, text = await click(world.fake, reply, buttons["up"], voter)
    assert text.startswith("Already counted 👍") and "1 👍 and 0 👎" in text
    _, text = await click(world.fake, reply, buttons["down"], voter)
    assert text.startswith("Changed your vote to 👎") and "0 👍 and 1 👎" in text
    with votes(world) as store:
        summary = store.summary(AdapterRef.from_path(world.settings.engine.adapter_path))
    assert (summary.base, summary.finetuned, summary.both_bad) == (1, 2, 1)
    assert summary.down >= 2


async def test_export_turns_those_clicks_into_both_files(world: World, tmp_path: Path):
    from bot.feedback.export import ExportOptions, export_feedback

    assert world.settings.feedback_db is not None
    out = tmp_path / "preferences"
    stats = export_feedback(world.settings.feedback_db, out, ExportOptions(test_fraction=0.5))
    prefs = [
        json.loads(line)
        for split in ("train", "test")
        for line in (out / split / "preferences.jsonl").read_text().splitlines()
    ]
    assert len(prefs) == 1  # the /compare: finetuned 2, base 1, both bad 1
    assert prefs[0]["prompt"] == [{"role": "user", "content": "Is rocker good on ice?"}]
    assert prefs[0]["chosen"][0]["content"].startswith("finetuned:")
    assert prefs[0]["rejected"][0]["content"].startswith("base:")
    assert stats["ratings"]["kept"] >= 2
    assert stats["ratings"]["dropped"].get("tie") == 1  # "Which skis for park?": 1 up, 1 down


async def test_an_unusable_feedback_db_is_one_line(tmp_path: Path) -> None:
    from freeski_common.errors import UserError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match=r"FEEDBACK_DB=.*cannot open it.*FEEDBACK_DB=off"):
        await feedback_views.DiscordFeedback.open(blocker / "feedback.sqlite", EngineSettings())


async def test_feedback_off_means_no_buttons(world: World):
    """Runs last: it replaces the shared bot by one without a feedback store."""
    await world.stop_bot()
    world.settings = bot_settings(
        engine=world.settings.engine, rate_limit_per_minute=0, feedback_db=None
    )
    await world.start_bot()
    asked = await world.fake.user_says("Park or pipe?", author=new_user())

    def final() -> dict | None:
        for message in world.fake.bot_messages():
            if (message.get("message_reference") or {}).get("message_id") == asked[
                "id"
            ] and not message["content"].endswith(" …"):
                return message
        return None

    reply = await world.fake.wait_for(final)
    assert custom_ids(reply) == []
    assert str(BOT_ID) == reply["author"]["id"]
