"""A server nobody here wrote: ``transformers serve`` behind INFERENCE_BACKEND=openai.

It serves SmolLM2-135M-Instruct as the base and a merged finetune (a small
random LoRA on SmolLM2, folded in by ``python -m finetune merge``) as the
finetuned model: it loads whatever model path a request names. A loopback
pass-through stands in front of it, as a load balancer would, so the test can
make it answer 503 once. Then, through ``python -m bot api`` (the official
``openai`` client) and the loopback Discord (its own OpenAIEngine):

* the first request carries ``repetition_penalty``; transformers serve refuses
  it (422 "Unexpected fields"), the engine drops it for good and asks again;
* base and finetuned answers, streamed and not, agree (greedy) and differ;
* a 503 is retried; a mention and ``/compare`` are answered in Discord;
* the server is killed mid-answer: the stream ends with a clear error, and
  the API and the bot live on and say the server cannot be reached.

docs/serving.md lists how this server's dialect differs from vLLM's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from bot.discord_bot.replies import STREAMING_MARK
from bot.serving.factory import build_engine
from bot.serving.openai_engine import CUT_OFF, UNREACHABLE
from bot.serving.settings import EngineSettings
from finetune.__main__ import main as finetune_main
from tests.discord_world import discord_world
from tests.fake_discord import final_comparison, user_payload
from tests.loopback import bot_api, free_port
from tests.passthrough import Passthrough

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What skis should I get for park?"}]
LONG = [{"role": "user", "content": "Write a long story about a ski trip to the Alps."}]
TOKENS = 12


@pytest.fixture(scope="module")
def merged_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with a small random adapter on SmolLM2, merged as a user would merge one."""
    import torch
    from peft import LoraConfig

    from finetune.config import parse_config
    from finetune.modeling import (
        QuantOptions,
        attach_new_adapter,
        load_base_model,
        load_tokenizer,
        save_adapter,
    )

    tmp = tmp_path_factory.mktemp("merged")
    run = tmp / "run"
    config = parse_config(
        [
            "--config",
            str(REPO / "configs" / "smollm2-cpu.yaml"),
            "--model",
            str(smollm2_dir),
            "--dataset",
            str(REPO / "tests" / "fixtures" / "dataset"),
            "--output-dir",
            str(run),
        ]
    )
    run.mkdir()
    config.save(run / "config.yaml")
    torch.manual_seed(0)
    model = load_base_model(smollm2_dir, quant=QuantOptions(load_in_4bit=False), device="cpu")
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    save_adapter(attach_new_adapter(model, lora), run / "adapter", load_tokenizer(smollm2_dir))
    out = tmp / "merged-model"
    assert finetune_main(["merge", "--run", str(run), "--out", str(out), "--dtype", "float32"]) == 0
    return out


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``transformers serve`` on a free loopback port: (process, base URL without /v1)."""
    port = free_port()
    log = (tmp_path / "transformers-serve.log").open("wb")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "transformers"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "transformers-serve.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "transformers serve never came up"
                time.sleep(0.5)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        log.close()


def api_env(openai_url: str, base: Path, merged: Path) -> dict[str, str | None]:
    return {
        "INFERENCE_BACKEND": "openai",
        "OPENAI_BASE_URL": openai_url,
        "BASE_MODEL_NAME": str(base),
        "FINETUNED_MODEL_NAME": str(merged),
        "MAX_NEW_TOKENS": "200",
        "TEMPERATURE": "0",
        # Unset, for the defaults: repetition_penalty 1.15, offered as an extension.
        "REPETITION_PENALTY": None,
        "OPENAI_SAMPLING_EXTENSIONS": None,
        "SYSTEM_PROMPT": None,
    }


async def ask(client: AsyncOpenAI, model: str, *, stream: bool = False) -> str:
    if not stream:
        done = await client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=TOKENS
        )
        return done.choices[0].message.content or ""
    chunks = await client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in chunks:
        pieces += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens > 0
    return "".join(pieces)


async def test_api_and_discord_answer_through_transformers_serve(
    peer: tuple[subprocess.Popen[bytes], str],
    smollm2_dir: Path,
    merged_dir: Path,
    tmp_path: Path,
):
    peer_process, peer_url = peer
    proxy = Passthrough(peer_url)
    async with proxy.running():
        with (
            contextlib.ExitStack() as stack
        ):  # started and stopped on a thread: the proxy runs here
            env = api_env(proxy.url, smollm2_dir, merged_dir)
            api = await asyncio.to_thread(stack.enter_context, bot_api(env, tmp_path))
            client = AsyncOpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=180)

            # Refused once for repetition_penalty, then never sent again.
            want = {variant: await ask(client, variant) for variant in ("base", "finetuned")}
            assert proxy.statuses[:2] == [422, 200]
            assert proxy.bodies[0]["repetition_penalty"] == 1.15
            assert not any("repetition_penalty" in body for body in proxy.bodies[1:])
            assert [b["model"] for b in proxy.bodies[1:3]] == [str(smollm2_dir), str(merged_dir)]
            assert want["base"] and want["finetuned"] and want["base"] != want["finetuned"]

            for variant, text in want.items():  # greedy: streamed is the same answer
                assert await ask(client, variant, stream=True) == text

            proxy.fail_next(503, {"Retry-After": "0"})
            sent = len(proxy.statuses)
            assert await ask(client, "finetuned") == want["finetuned"]
            assert proxy.statuses[sent:] == [503, 200]

            await discord_round(proxy.url, smollm2_dir, merged_dir, want, peer_process, client)

            # The API lives on after the server died, and says it cannot be reached.
            with pytest.raises(openai.APIStatusError) as refused:
                await ask(client, "base")
            assert refused.value.status_code == 503
            assert UNREACHABLE in refused.value.message
            async with (
                aiohttp.ClientSession() as session,
                session.get(api.url.removesuffix("/v1") + "/healthz") as health,
            ):
                assert (await health.json())["engine"]["backend"] == "openai"
            assert api.process.poll() is None
            assert await asyncio.to_thread(api.stop, 30) == 0
    assert "".join(api.log).count("refuses the sampling extension repetition_penalty") == 1


async def discord_round(
    openai_url: str,
    base: Path,
    merged: Path,
    want: dict[str, str],
    peer_process: subprocess.Popen[bytes],
    api_client: AsyncOpenAI,
) -> None:
    """A mention and /compare in the loopback Discord, then the server killed mid-answer."""
    engine = build_engine(
        EngineSettings(
            backend="openai",
            openai_base_url=openai_url,
            base_model_name=str(base),
            finetuned_model_name=str(merged),
            temperature=0.0,
            max_new_tokens=TOKENS,
        )
    )
    async with discord_world(engine) as world:
        fake = world.fake

        def reply_to(message: dict, starting: str) -> dict | None:
            return next(
                (
                    m
                    for m in fake.bot_messages()
                    if (m.get("message_reference") or {}).get("message_id") == message["id"]
                    and m["content"].startswith(starting)
                    and not m["content"].endswith(STREAMING_MARK)
                ),
                None,
            )

        author = user_payload(940000000000000001, "skier")
        asked = await fake.user_says(QUESTION[0]["content"], author=author)
        await fake.wait_for(lambda: reply_to(asked, want["finetuned"]), 90)

        interaction = await fake.slash_command("compare", {"question": QUESTION[0]["content"]})
        original = await fake.wait_for(lambda: final_comparison(fake, interaction["token"]), 90)
        fields = {f["name"]: f["value"] for f in original["embeds"][0]["fields"]}
        labels = {"base": "A: base", "finetuned": "B: finetuned"}
        for variant, text in want.items():  # the bot may add a "cut at the length limit" note
            assert fields[labels[variant]].startswith(text.strip())

        # The server dies after the first words of a long answer.
        chunks = await api_client.chat.completions.create(
            model="base", messages=LONG, max_tokens=200, stream=True
        )
        with pytest.raises(openai.APIError) as cut:
            async for chunk in chunks:
                if any(c.delta.content for c in chunk.choices) and peer_process.poll() is None:
                    peer_process.kill()
        assert CUT_OFF in str(cut.value.message)
        peer_process.wait()

        asked = await fake.user_says(QUESTION[0]["content"], author=author)
        await fake.wait_for(lambda: reply_to(asked, f"⚠️ {UNREACHABLE}"), 60)
        assert world.connection is not None and not world.connection.done(), "still connected"
