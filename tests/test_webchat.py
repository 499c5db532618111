"""The web chat's routes over HTTP, without a browser: what is served, to whom, with which headers."""

from __future__ import annotations

import re

import aiohttp
import pytest

from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.api.webchat import STATIC_DIR
from tests.loopback import serve_app
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(30)


async def test_the_page_and_its_files_load_without_the_token_that_v1_needs() -> None:
    engine = ScriptedEngine()
    await engine.start()
    app = create_app(engine, ApiSettings(token="s3cret"))
    async with serve_app(app) as url, aiohttp.ClientSession(url) as client:
        async with client.get("/") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            page = await response.text()
            policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy
        assert "connect-src 'self'" in policy
        assert "unsafe-inline" not in policy
        # Everything the page loads is its own, from /static/, and present.
        assets = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert assets
        for asset in assets:
            assert asset.startswith("/static/"), asset
            async with client.get(asset) as response:
                assert response.status == 200, asset
                assert response.headers["Cache-Control"] == "no-cache"
        async with client.get("/static/webchat.js") as response:
            assert response.content_type in {"text/javascript", "application/javascript"}
            script = await response.text()
        for module in re.findall(r'from "\./([^"]+)"', script):
            assert (STATIC_DIR / module).is_file(), module
        async with client.get("/v1/models") as response:
            assert response.status == 401
