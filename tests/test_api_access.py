"""Who may call the API: the bearer token, and Host and Origin on a token-less loopback server.

Requests are written byte by byte on a raw socket, so headers no HTTP
client library would send (a foreign ``Host``, bytes that are not ASCII)
reach the server exactly as an attacker would send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.serving.engine import EngineStatus
from tests.loopback import serve_app
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(30)

TOKEN = "s3cret-token"
CHAT = json.dumps(
    {"model": "base", "messages": [{"role": "user", "content": "wax?"}], "max_tokens": 2}
).encode()


@dataclasses.dataclass
class Server:
    port: int
    engine: ScriptedEngine

    async def send(
        self,
        method: str,
        path: str,
        headers: dict[str, bytes | str] | None = None,
        body: bytes = b"",
    ) -> tuple[int, Any]:
        """One request on a fresh connection, headers exactly as given; the status and JSON body."""
        fields = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        head = f"{method} {path} HTTP/1.1\r\n".encode()
        for name, value in fields.items():
            head += name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
            head += b"\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(head + body)
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
        status_line, _, rest = response.partition(b"\r\n")
        _, _, payload = rest.partition(b"\r\n\r\n")
        status = int(status_line.split()[1])
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload


@contextlib.asynccontextmanager
async def api(settings: ApiSettings, engine: ScriptedEngine | None = None) -> AsyncIterator[Server]:
    engine = engine or ScriptedEngine()
    await engine.start()
    async with serve_app(create_app(engine, settings)) as url:
        yield Server(urlsplit(url).port or 0, engine)


@pytest.mark.parametrize(
    "authorization", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"BeArEr  {TOKEN} "]
)
async def test_the_bearer_scheme_is_case_insensitive(authorization: str) -> None:
    async with api(ApiSettings(token=TOKEN)) as server:
        status, body = await server.send("GET", "/v1/models", {"Authorization": authorization})
    assert status == 200 and body["object"] == "list"


@pytest.mark.parametrize(
    "authorization",
    [
        b"Bearer \xff\xfe\x80",  # not UTF-8 at all
        "Bearer s3cret-tökén".encode(),  # UTF-8, not ASCII
        "Bearer \u2028".encode(),
        b"\xff " + TOKEN.encode(),  # an odd scheme before the right token
        f"Basic {TOKEN}".encode(),
        TOKEN.encode(),  # no scheme
        b"Bearer",
        b"Bearer ",
    ],
)
async def test_odd_authorization_headers_are_a_401_not_a_500(authorization: bytes) -> None:
    async with api(ApiSettings(token=TOKEN)) as server:
        status, body = await server.send(
            "POST", "/v1/chat/completions", {"Authorization": authorization}, CHAT
        )
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
        assert server.engine.requests == []
        # the server goes on answering
        assert (await server.send("GET", "/v1/models", {"Authorization": f"Bearer {TOKEN}"}))[
            0
        ] == 200


@pytest.mark.parametrize("path", ["/", "/v1/models", "/healthz", "/static/webchat.js"])
async def test_without_a_token_a_foreign_host_is_refused(path: str) -> None:
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1."""
    async with api(ApiSettings()) as server:
        status, body = await server.send("GET", path, {"Host": f"evil.example:{server.port}"})
    assert status == 403
    assert body["error"]["code"] == "foreign_host"
    assert "API_ALLOWED_HOSTS" in body["error"]["message"]


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Host": b"\xff\xfe.example"}, "foreign_host"),
        ({"Host": "127.0.0.1:notaport"}, "foreign_host"),
        ({"Host": "127.0.0.1:99999"}, "foreign_host"),
        ({"Origin": "http://127.0.0.1:99999"}, "foreign_origin"),
        ({"Origin": b"http://\xc3\xa9vil.example"}, "foreign_origin"),
        ({"Origin": "http://[::1"}, "foreign_origin"),
    ],
)
async def test_mangled_host_and_origin_headers_are_a_403_not_a_500(
    headers: dict[str, bytes | str], code: str
) -> None:
    async with api(ApiSettings()) as server:
        status, body = await server.send("POST", "/v1/chat/completions", headers, CHAT)
        assert (status, body["error"]["code"]) == (403, code)
        assert server.engine.requests == []


async def test_a_foreign_host_reaches_no_engine() -> None:
    async with api(ApiSettings()) as server:
        status, _ = await server.send(
            "POST",
            "/v1/chat/completions",
            {"Host": "evil.example", "Content-Type": "text/plain"},
            CHAT,
        )
        assert (status, server.engine.requests) == (403, [])


@pytest.mark.parametrize(
    ("host", "settings", "status"),
    [
        ("127.0.0.1:{port}", ApiSettings(), 200),
        ("localhost:{port}", ApiSettings(), 200),
        ("LOCALHOST", ApiSettings(), 200),
        ("[::1]:{port}", ApiSettings(), 200),
        ("127.0.0.2:{port}", ApiSettings(), 200),
        ("bot.lan:{port}", ApiSettings(), 403),
        ("bot.lan:{port}", ApiSettings(allowed_hosts=("bot.lan",)), 200),
        ("evil.example:{port}", ApiSettings(token=TOKEN), 200),  # the token guards this server
    ],
)
async def test_the_servers_own_names_pass(host: str, settings: ApiSettings, status: int) -> None:
    async with api(settings) as server:
        headers = {"Host": host.format(port=server.port), "Authorization": f"Bearer {TOKEN}"}
        assert (await server.send("GET", "/v1/models", headers))[0] == status


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "https://evil.example:{port}",
        "http://127.0.0.1.evil.example:{port}",
        "http://127.0.0.1:1",  # another server on this machine
        "null",  # a sandboxed frame, a file:// page
        "chrome-extension://abc",
    ],
)
async def test_without_a_token_a_foreign_origin_is_refused(origin: str) -> None:
    """A web page POSTing text/plain at the API: no CORS preflight stops it, the server must."""
    async with api(ApiSettings()) as server:
        status, body = await server.send(
            "POST",
            "/v1/chat/completions",
            {"Origin": origin.format(port=server.port), "Content-Type": "text/plain"},
            CHAT,
        )
        assert (status, body["error"]["code"]) == (403, "foreign_origin")
        assert server.engine.requests == []


async def test_the_servers_own_pages_may_post() -> None:
    async with api(ApiSettings()) as server:
        own = f"http://127.0.0.1:{server.port}"
        status, body = await server.send(
            "POST",
            "/v1/chat/completions",
            {"Origin": own, "Content-Type": "application/json"},
            CHAT,
        )
        assert (status, body["object"]) == (200, "chat.completion")
        status, _ = await server.send(
            "POST",
            "/v1/chat/completions",
            {"Host": f"localhost:{server.port}", "Origin": f"http://localhost:{server.port}"},
            CHAT,
        )
        assert status == 200


class LocalPathsEngine(ScriptedEngine):
    """An engine that reports local directories, as the local backend does."""

    def __init__(self, model: str, adapter: str | None) -> None:
        super().__init__()
        self._paths = (model, adapter)

    def status(self) -> EngineStatus:
        model, adapter = self._paths
        return dataclasses.replace(
            super().status(),
            backend="local",
            model=model,
            adapter=adapter,
            grounding="off: no forum store at /home/alice/forum.sqlite: crawl one with "
            "`python -m crawl fetch --db /home/alice/forum.sqlite`",
        )


@pytest.mark.parametrize(
    ("model", "adapter", "shown"),
    [
        (
            "/home/alice/models/mistral-7b",
            "/home/alice/freeski/runs/ski-v1/adapter",
            ("mistral-7b", "ski-v1/adapter"),
        ),
        ("~/models/tiny", "./adapters/dpo-2", ("tiny", "dpo-2")),
        ("mistralai/Mistral-7B-Instruct-v0.2", None, ("mistralai/Mistral-7B-Instruct-v0.2", None)),
    ],
)
async def test_healthz_names_no_file_paths(
    model: str, adapter: str | None, shown: tuple[str, str | None]
) -> None:
    async with api(ApiSettings(), LocalPathsEngine(model, adapter)) as server:
        status, body = await server.send("GET", "/healthz")
    assert status == 200
    assert (body["engine"]["model"], body["engine"]["adapter"]) == shown
    assert body["engine"]["grounding"].startswith("off: no forum store at forum.sqlite: ")
    assert "alice" not in json.dumps(body)


async def test_healthz_hides_a_relative_model_directory_that_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models" / "smollm2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    async with api(ApiSettings(), LocalPathsEngine("models/smollm2", "runs/x/adapter")) as server:
        _, body = await server.send("GET", "/healthz")
    assert (body["engine"]["model"], body["engine"]["adapter"]) == ("smollm2", "x/adapter")
