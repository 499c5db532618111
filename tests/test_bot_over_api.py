"""Scaling out: the Discord bot with INFERENCE_BACKEND=openai, answered by a running `python -m bot api`.

The API process serves the tiny model with its adapter through the LocalEngine;
the bot talks to it through the OpenAIEngine, exactly as it would talk to vLLM.
Greedy decoding makes the API's own answer the expected Discord reply (the bot
may add a note when an answer stops at the length limit).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.discord_bot.client import FreeskiBot
from bot.discord_bot.settings import BotSettings
from bot.serving.factory import build_engine
from bot.serving.settings import EngineSettings
from tests.fake_discord import GUILD_ID, FakeDiscord, final_comparison, user_payload
from tests.loopback import api_url_from_log

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What skis should I get for park?"


@pytest.fixture(scope="module")
def api_url(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory) -> Iterator[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "INFERENCE_BACKEND": "local",
        "BASE_MODEL": str(tiny_model_dir),
        "ADAPTER_PATH": str(tiny_adapter_dir),
        "MAX_NEW_TOKENS": "12",
        "TEMPERATURE": "0",
        "API_TOKEN": "",
        "METRICS_PORT": "",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "api", "--port", "0"],
        cwd=tmp_path_factory.mktemp("api"),  # no .env from the checkout
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield api_url_from_log(process, timeout_s=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


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
    await engine.start()
    fake = FakeDiscord()
    await fake.start()
    settings = BotSettings(
        discord_token="fake-token-" + "x" * 40, engine=EngineSettings(), guild_id=GUILD_ID
    )
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            fake.patch_discord(monkeypatch)
            bot = FreeskiBot(settings, engine, edit_interval_s=0.05, shutdown_grace_s=5)
            connection = asyncio.create_task(bot.start(settings.discord_token))
            await asyncio.wait_for(bot.wait_until_ready(), 15)

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
            assert fields.keys() == want.keys()
            for variant, text in want.items():  # the bot may add a "cut at the length limit" note
                assert fields[variant].startswith(text)

            await asyncio.wait_for(bot.close(), 15)
            await asyncio.wait({connection}, timeout=10)
    finally:
        await engine.close()
        await fake.close()
