"""The bot end to end through the real LocalEngine: the tiny model, 4-bit, adapter unmerged."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.discord_bot.commands import NOTES
from bot.discord_bot.replies import STREAMING_MARK
from bot.serving.local_engine import LocalEngine
from bot.serving.settings import EngineSettings
from finetune.modeling import load_for_inference
from tests.discord_world import bot_settings, discord_world

pytestmark = pytest.mark.timeout(120)

EMPTY = "_(the model gave an empty answer)_"


async def test_mention_and_compare_through_the_tiny_model(
    tiny_model_dir: Path, tiny_adapter_dir: Path
):
    engine_settings = EngineSettings(
        base_model=str(tiny_model_dir),
        adapter_path=tiny_adapter_dir,
        max_new_tokens=8,
        temperature=0.0,
        repetition_penalty=1.0,
    )
    loaded = load_for_inference(tiny_model_dir, tiny_adapter_dir, load_in_4bit=True)
    engine = LocalEngine(engine_settings, model_and_tokenizer=loaded)
    settings = bot_settings(engine=engine_settings)
    async with discord_world(engine, settings) as world:
        fake = world.fake
        question = "What skis should I get for park?"
        asked = await fake.user_says(question)
        reply = await fake.wait_for(
            lambda: next(
                (
                    m
                    for m in fake.bot_messages()
                    if (m.get("message_reference") or {}).get("message_id") == asked["id"]
                    and not m["content"].endswith(" …")
                ),
                None,
            ),
            timeout=30,
        )
        messages = [{"role": "user", "content": question}]
        direct = await engine.generate(messages, variant="finetuned")
        note = NOTES.get(direct.finish_reason)
        assert reply["content"] == (direct.text or EMPTY) + (f"\n\n{note}" if note else "")

        interaction = await fake.slash_command("compare", {"question": question})
        original = await fake.wait_for(
            lambda: next(
                (
                    m
                    for m in fake.messages.values()
                    if m.get("interaction_token") == interaction["token"]
                    and m["embeds"]
                    and not any(  # a preview while the answers are written
                        f["value"].endswith(STREAMING_MARK.strip())
                        for f in m["embeds"][0]["fields"]
                    )
                ),
                None,
            ),
            timeout=30,
        )
        base, finetuned = await engine.compare(messages)
        fields = {f["name"]: f["value"] for f in original["embeds"][0]["fields"]}
        assert fields == {  # side A is base, B the default adapter, each under its name
            "A: base": base.text or "_(empty answer)_",
            "B: finetuned": finetuned.text or "_(empty answer)_",
        }
        assert engine.status().batches_served >= 3
