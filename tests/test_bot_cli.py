"""``python -m bot``: clear one-line errors, the console chat, and a clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import bot.serving.factory
from bot.__main__ import serve
from bot.console import run_console
from bot.discord_bot.settings import BotSettings
from bot.serving.settings import EngineSettings
from freeski_common.errors import UserError
from tests.fake_discord import GUILD_ID, FakeDiscord
from tests.scripted_adapters import ScriptedAdapters
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]


def run_bot(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m bot`` in an empty directory (no .env) with only ``env`` set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "BASE_MODEL"))}
    clean.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_missing_token_is_one_line_and_exit_2(tmp_path: Path):
    result = run_bot(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: DISCORD_TOKEN is not set: set it in the environment or in .env (see .env.example)"
    ]


def test_a_missing_model_directory_is_one_line(tmp_path: Path):
    result = run_bot(tmp_path, "--console", BASE_MODEL=str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: BASE_MODEL=")


def test_api_subcommand_is_dispatched(tmp_path: Path):
    result = run_bot(tmp_path, "api", "--help")
    assert result.returncode == 0
    assert "python -m bot api" in result.stdout


async def test_console_chat_answers_compares_and_keeps_the_conversation():
    engine = ScriptedEngine()
    lines = iter(["what wax today", "/compare which skis", "and tomorrow", "/quit"])
    out = io.StringIO()
    code = await run_console(
        EngineSettings(), engine=engine, read_line=lambda: next(lines), out=out
    )
    text = out.getvalue()
    assert code == 0
    assert "[finetuned] finetuned: today wax what end." in text
    assert "--- base ---\nbase: which skis end." in text
    assert "--- finetuned ---\nfinetuned: skis which end." in text
    _, last_messages, _ = engine.requests[-1]
    assert [m["content"] for m in last_messages] == [
        "what wax today",
        "finetuned: today wax what end.",
        "and tomorrow",
    ]
    assert not engine.ready, "the engine is closed when the chat ends"


async def test_console_lists_the_served_models_and_asks_the_one_chosen():
    engine = ScriptedAdapters(["v1", "v2"], "v2")
    lines = iter(["/models", "/model v9", "/model v1", "wax?", "/quit"])
    out = io.StringIO()
    await run_console(EngineSettings(), engine=engine, read_line=lambda: next(lines), out=out)
    text = out.getvalue()
    assert "  base\n  finetuned (= v2)\n  v1\n  v2 (default)\n" in text
    assert "no model called 'v9': pick one of base, finetuned, v1, v2" in text
    assert "[v1] v1: wax? end." in text


async def test_sigterm_disconnects_and_returns_0(monkeypatch: pytest.MonkeyPatch):
    fake = FakeDiscord()
    await fake.start()
    fake.patch_discord(monkeypatch)
    engine = ScriptedEngine()
    monkeypatch.setattr(bot.serving.factory, "build_engine", lambda settings: engine)
    settings = BotSettings(
        discord_token="fake-token-" + "x" * 40, engine=EngineSettings(), guild_id=GUILD_ID
    )
    try:
        serving = asyncio.create_task(serve(settings))
        await fake.wait_for(lambda: fake.commands.get(f"guild:{GUILD_ID}"))
        await fake.connected()
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 20) == 0
    finally:
        await fake.close()
    assert not engine.ready, "the engine is released on shutdown"


async def test_a_rejected_token_is_one_clear_error(monkeypatch: pytest.MonkeyPatch):
    fake = FakeDiscord(reject_token=True)
    await fake.start()
    fake.patch_discord(monkeypatch)
    engine = ScriptedEngine()
    monkeypatch.setattr(bot.serving.factory, "build_engine", lambda settings: engine)
    settings = BotSettings(discord_token="revoked-token-" + "x" * 40, engine=EngineSettings())
    try:
        with pytest.raises(UserError, match="Discord rejected DISCORD_TOKEN"):
            await asyncio.wait_for(serve(settings), 20)
    finally:
        await fake.close()
    assert not engine.ready
