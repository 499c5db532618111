"""Scaling out: the Discord bot with INFERENCE_BACKEND=openai, answered by a running `python -m bot api`.

The API process serves the tiny model with its adapter through the LocalEngine;
the bot talks to it through the OpenAIEngine, exactly as it would talk to vLLM.
Greedy decoding makes the API's own answer the expected Discord reply (the bot
may add a note when an answer stops at the length limit).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.serving.factory import build_engine
from bot.serving.settings import EngineSettings
from tests.discord_world import discord_world
from tests.fake_discord import final_comparison, user_payload
from tests.loopback import bot_api

pytestmark = pytest.mark.timeout(120)

QUESTION = "What skis should I get for park?"


@pytest.fixture(scope="module")
def api_url(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory) -> Iterator[str]:
    env = {
        "INFERENCE_BACKEND": "local",
        "BASE_MODEL": str(tiny_model_dir),
        "ADAPTER_PATH": str(tiny_adapter_dir),
        "MAX_NEW_TOKENS": "12",
        "TEMPERATURE": "0",
    }
    with bot_api(env, tmp_path_factory.mktemp("api")) as api:
        yield api.url


def api_answer(url: str, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": QUESTION}]})
    request = urllib.request.Request(
        f"{url}/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


async def test_mentions_and_compare_are_answered_through_the_api(api_url: str):
    want = {variant: api_answer(api_url, variant) for variant in ("base", "finetuned")}
    assert want["base"] != want["finetuned"]

    # The bot side sends its own generation settings; match the server's greedy, short ones.
    engine = build_engine(
        EngineSettings(
            backend="openai", openai_base_url=api_url, temperature=0.0, max_new_tokens=12
        )
    )
    async with discord_world(engine) as world:
        fake = world.fake
        asked = await fake.user_says(QUESTION, author=user_payload(940000000000000001, "skier"))
        reply = await fake.wait_for(
            lambda: next(
                (
                    m
                    for m in fake.bot_messages()
                    if (m.get("message_reference") or {}).get("message_id") == asked["id"]
                    and m["content"].startswith(want["finetuned"])
                ),
                None,
            ),
            30,
        )
        assert reply["sent_allowed_mentions"] == {"parse": []}

        interaction = await fake.slash_command("compare", {"question": QUESTION})
        original = await fake.wait_for(lambda: final_comparison(fake, interaction["token"]), 30)
        fields = {f["name"]: f["value"] for f in original["embeds"][0]["fields"]}
        labels = {"base": "A: base", "finetuned": "B: finetuned"}  # not blind: named sides
        assert list(fields) == [labels[variant] for variant in want]
        for variant, text in want.items():  # the bot may add a "cut at the length limit" note
            assert fields[labels[variant]].startswith(text)
