"""Bad or missing configuration stops the program with one line naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.api.settings import ApiSettings
from bot.discord_bot.settings import BotSettings
from bot.serving.settings import EngineSettings
from freeski_common.errors import UserError, cli_entry

TOKEN = "x" * 24 + ".abcdef.ghijklmnopqrstuvwxyz"
ALL_VARS = [
    "DISCORD_TOKEN",
    "DISCORD_GUILD_ID",
    "BASE_MODEL",
    "ADAPTER_PATH",
    "LOAD_IN_4BIT",
    "MAX_BATCH",
    "QUEUE_SIZE",
    "MAX_NEW_TOKENS",
    "RATE_LIMIT_PER_MINUTE",
    "TOP_P",
    "INFERENCE_BACKEND",
    "ALLOWED_CHANNEL_IDS",
    "METRICS_PORT",
    "LOG_LEVEL",
    "API_PORT",
    "TEMPERATURE",
    "OPENAI_SAMPLING_EXTENSIONS",
    "ADAPTERS",
    "DEFAULT_ADAPTER",
    "MAX_ADAPTERS",
    "RUNTIME_ADAPTER_UPDATES",
    "API_TOKEN",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Isolate from the developer's shell and from any .env in the checkout."""
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_load_with_a_token(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    settings = BotSettings.from_env()
    assert settings.engine.max_batch == 8
    assert settings.guild_id is None
    assert TOKEN not in repr(settings), "the token must never appear in logs"


def test_values_are_parsed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv("DISCORD_GUILD_ID", "1234")
    monkeypatch.setenv("MAX_BATCH", "16")
    monkeypatch.setenv("LOAD_IN_4BIT", "false")
    monkeypatch.setenv("ALLOWED_CHANNEL_IDS", "1, 2,3")
    settings = BotSettings.from_env()
    assert settings.guild_id == 1234
    assert settings.engine.max_batch == 16
    assert settings.engine.load_in_4bit is False
    assert settings.allowed_channel_ids == (1, 2, 3)


@pytest.mark.parametrize(
    ("value", "extensions"),
    [
        (None, ("repetition_penalty",)),
        ("none", ()),
        ("Repetition_Penalty", ("repetition_penalty",)),
    ],
)
def test_sampling_extensions_setting(
    monkeypatch: pytest.MonkeyPatch, value: str | None, extensions: tuple[str, ...]
):
    if value is not None:
        monkeypatch.setenv("OPENAI_SAMPLING_EXTENSIONS", value)
    assert EngineSettings.from_env().openai_sampling_extensions == extensions


@pytest.mark.parametrize(
    "env,needle",
    [
        ({}, "DISCORD_TOKEN is not set"),
        ({"DISCORD_TOKEN": "short"}, "DISCORD_TOKEN does not look like"),
        ({"DISCORD_TOKEN": TOKEN, "MAX_BATCH": "eight"}, "MAX_BATCH='eight' is not a whole number"),
        ({"DISCORD_TOKEN": TOKEN, "MAX_BATCH": "0"}, "MAX_BATCH=0 is too small"),
        ({"DISCORD_TOKEN": TOKEN, "LOAD_IN_4BIT": "maybe"}, "LOAD_IN_4BIT='maybe' is not a yes/no"),
        (
            {"DISCORD_TOKEN": TOKEN, "BASE_MODEL": "./no/such/model"},
            "BASE_MODEL=./no/such/model: no such",
        ),
        (
            {"DISCORD_TOKEN": TOKEN, "ADAPTER_PATH": "/nonexistent/adapter"},
            "ADAPTER_PATH=/nonexistent",
        ),
        ({"DISCORD_TOKEN": TOKEN, "DISCORD_GUILD_ID": "my-server"}, "DISCORD_GUILD_ID='my-server'"),
        ({"DISCORD_TOKEN": TOKEN, "TOP_P": "1.5"}, "TOP_P=1.5 is too large"),
        (
            {"DISCORD_TOKEN": TOKEN, "INFERENCE_BACKEND": "tpu"},
            "INFERENCE_BACKEND='tpu' is unknown",
        ),
        (
            {"DISCORD_TOKEN": TOKEN, "ALLOWED_CHANNEL_IDS": "general"},
            "ALLOWED_CHANNEL_IDS holds 'general'",
        ),
        ({"DISCORD_TOKEN": TOKEN, "LOG_LEVEL": "loud"}, "LOG_LEVEL='LOUD' is unknown"),
        (
            {"DISCORD_TOKEN": TOKEN, "OPENAI_SAMPLING_EXTENSIONS": "top_k"},
            "OPENAI_SAMPLING_EXTENSIONS names top_k",
        ),
    ],
)
def test_bad_config_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, env: dict, needle: str):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as info:
        BotSettings.from_env()
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def _adapter_dirs(root: Path, *names: str) -> list[Path]:
    """Directories that look like adapters to the settings (an adapter_config.json each)."""
    dirs = []
    for name in names:
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text("{}")
        dirs.append(root / name)
    return dirs


def test_adapters_are_served_by_name_with_a_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    v1, v2 = _adapter_dirs(tmp_path, "v1", "v2")
    monkeypatch.setenv("ADAPTERS", f"v1={v1}, v2={v2}")
    settings = EngineSettings.from_env()
    assert [(s.name, s.path) for s in settings.adapter_specs] == [("v1", v1), ("v2", v2)]
    assert settings.default_adapter_name == "v1", "the first listed, unless DEFAULT_ADAPTER says"
    monkeypatch.setenv("DEFAULT_ADAPTER", "v2")
    assert EngineSettings.from_env().default_adapter_name == "v2"


def test_adapter_path_alone_is_one_adapter_named_finetuned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    (adapter,) = _adapter_dirs(tmp_path, "adapter")
    monkeypatch.setenv("ADAPTER_PATH", str(adapter))
    settings = EngineSettings.from_env()
    assert [(s.name, s.path) for s in settings.adapter_specs] == [("finetuned", adapter)]
    assert settings.default_adapter_name == "finetuned"
    monkeypatch.delenv("ADAPTER_PATH")
    assert EngineSettings.from_env().adapter_specs == ()


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"ADAPTERS": "v1={a},v1={b}"}, "two adapters are named 'v1'"),
        ({"ADAPTERS": "V1={a}"}, "adapter name 'V1' is not valid"),
        ({"ADAPTERS": "{long}={a}"}, "is not valid: use lowercase letters"),
        ({"ADAPTERS": "base={a}"}, "adapter name 'base' is reserved"),
        ({"ADAPTERS": "finetuned={a}"}, "adapter name 'finetuned' is reserved"),
        ({"ADAPTERS": "v1"}, "'v1' is not name=path"),
        ({"ADAPTERS": "v1={a}", "ADAPTER_PATH": "{a}"}, "ADAPTERS and ADAPTER_PATH are both set"),
        ({"ADAPTERS": "v1={a},v2={b}", "DEFAULT_ADAPTER": "v3"}, "DEFAULT_ADAPTER=v3 names no"),
        ({"ADAPTER_PATH": "{a}", "DEFAULT_ADAPTER": "v1"}, "DEFAULT_ADAPTER=v1 names no"),
        ({"ADAPTERS": "v1={a},v2={b}", "MAX_ADAPTERS": "1"}, "more than MAX_ADAPTERS=1"),
        ({"ADAPTERS": "v1={a},v2=/nonexistent"}, "ADAPTERS (v2)=/nonexistent: no adapter_config"),
    ],
)
def test_bad_adapter_config_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], needle: str
):
    a, b = _adapter_dirs(tmp_path, "a", "b")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(a=a, b=b, long="v" * 33))
    with pytest.raises(UserError) as info:
        EngineSettings.from_env()
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_runtime_adapter_updates_need_an_api_token(monkeypatch: pytest.MonkeyPatch):
    assert ApiSettings.from_env().runtime_adapter_updates is False, "off by default"
    monkeypatch.setenv("RUNTIME_ADAPTER_UPDATES", "true")
    with pytest.raises(UserError, match=r"^RUNTIME_ADAPTER_UPDATES=true .* set API_TOKEN"):
        ApiSettings.from_env()
    monkeypatch.setenv("API_TOKEN", "s3cret-token")
    assert ApiSettings.from_env().runtime_adapter_updates is True


def test_token_read_from_dotenv_but_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    import bot.serving.env

    (tmp_path / ".env").write_text(f"DISCORD_TOKEN={TOKEN}\nMAX_BATCH=3\n")
    monkeypatch.setenv("MAX_BATCH", "5")
    monkeypatch.setattr(bot.serving.env, "_loaded", False)
    settings = BotSettings.from_env()
    assert settings.discord_token == TOKEN
    assert settings.engine.max_batch == 5


def test_api_and_engine_settings_read_their_variables(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("API_PORT", "9001")
    monkeypatch.setenv("INFERENCE_BACKEND", "openai")
    assert ApiSettings.from_env().port == 9001
    assert EngineSettings.from_env().backend == "openai"


def test_cli_entry_reports_user_errors_without_traceback(capsys: pytest.CaptureFixture[str]):
    @cli_entry
    def main() -> int:
        raise UserError("MAX_BATCH='x' is not a whole number: set it to e.g. 8")

    assert main() == 2
    err = capsys.readouterr().err
    assert err == "error: MAX_BATCH='x' is not a whole number: set it to e.g. 8\n"


def test_cli_bad_option_value_exits_with_one_line(tmp_path: Path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune",
            "tiny-model",
            "--out",
            str(tmp_path),
            "--hidden-size",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: hidden size 100 is not a multiple of 32 (bitsandbytes' CPU kernel needs it)"
    ]
